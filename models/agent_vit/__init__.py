"""Agent-attention vision transformer (test model): `agent_vit_pico`, isotropic blocks of `AgentAttention`."""
from jaxattn.models.agent_vit import variants
from jaxattn.models.agent_vit.model import AgentBlock, AgentViT

__all__ = ["AgentBlock", "AgentViT", "variants"]
