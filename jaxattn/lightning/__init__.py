"""Lightning attention (TransNormerLLM): causal linear attention with per-head decay, chunked, with a state."""
from jaxattn.lightning.api import lightning_attention, lightning_attention_step
from jaxattn.lightning.slopes import lightning_slopes

__all__ = ["lightning_attention", "lightning_attention_step", "lightning_slopes"]
