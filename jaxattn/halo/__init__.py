"""Halo attention (HaloNet; timm `HaloAttn` semantics), heads-last."""
from jaxattn.halo.api import halo_attention

__all__ = ["halo_attention"]
