"""BiFormer: vision transformers with bi-level routing attention (`biformer_pico` .. `biformer_base`), with
weight import."""
from jaxattn.models.biformer import convert, variants
from jaxattn.models.biformer.model import BiFormer

__all__ = ["BiFormer", "convert", "variants"]
