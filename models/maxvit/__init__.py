"""MaxViT (Tu et al. 2022) on `jaxattn.block_attention` / `jaxattn.grid_attention`; timm-compatible weights.

Registered: `maxvit_tiny`, `maxvit_small`, `maxvit_base`, `maxvit_large`, `maxvit_pico`. timm checkpoints
`maxvit_{tiny,small,base,large}_tf_{224,384,512}` load with `jaxattn.models.convert.from_timm`, into scanned or
unrolled models (`scan_blocks`; `stacking` maps parameter trees between the two layouts).
"""
from jaxattn.models.maxvit import convert, stacking, variants
from jaxattn.models.maxvit.attention import expand_rel_pos_bias, rel_pos_index, resize_rel_pos_bias
from jaxattn.models.maxvit.convert import load_timm_maxvit, resize_rel_pos_bias_tables
from jaxattn.models.maxvit.model import MaxViT, check_image_size

__all__ = ["MaxViT", "check_image_size", "expand_rel_pos_bias", "rel_pos_index", "resize_rel_pos_bias",
           "resize_rel_pos_bias_tables", "load_timm_maxvit", "convert", "stacking", "variants"]
