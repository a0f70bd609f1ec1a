"""MaxViT multi-axis attention: block (window) attention and grid (dilated, global) attention, heads-last."""
from jaxattn.multi_axis.api import block_attention, grid_attention

__all__ = ["block_attention", "grid_attention"]
