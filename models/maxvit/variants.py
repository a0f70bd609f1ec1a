"""Registered MaxViT sizes (paper / timm `maxvit_*_tf`), plus `maxvit_pico` for tests and small-image training.

Every builder accepts any `MaxViT` constructor argument as an override (`img_size=384`, `depths=...`,
`drop_path_rate=...`). Default `drop_path_rate` is the paper's (1 - survival probability at the last block).
"""
from __future__ import annotations

from jaxattn.models.maxvit.model import MaxViT
from jaxattn.models.registry import register

CONFIGS = {
    # name: stem width, depths, stage widths, drop path rate (paper survival 0.8 / 0.7 / 0.6 / 0.4)
    "maxvit_tiny": dict(stem_width=64, depths=(2, 2, 5, 2), embed_dim=(64, 128, 256, 512), drop_path_rate=0.2),
    "maxvit_small": dict(stem_width=64, depths=(2, 2, 5, 2), embed_dim=(96, 192, 384, 768), drop_path_rate=0.3),
    "maxvit_base": dict(stem_width=64, depths=(2, 6, 14, 2), embed_dim=(96, 192, 384, 768), drop_path_rate=0.4),
    "maxvit_large": dict(stem_width=128, depths=(2, 6, 14, 2), embed_dim=(128, 256, 512, 1024),
                         drop_path_rate=0.6),
    # Small model for tests and 8x8-digit training: 64 px -> window = grid = 2; heads of width 8.
    "maxvit_pico": dict(stem_width=16, depths=(1, 1, 1, 1), embed_dim=(16, 32, 64, 128), head_dim=8,
                        img_size=64, drop_path_rate=0.1),
}


def _build(name, rngs, overrides):
    return MaxViT(rngs=rngs, **{**CONFIGS[name], **overrides})


@register("maxvit_tiny")
def maxvit_tiny(*, rngs, **overrides):
    """MaxViT-T: 30,916,528 parameters at 1000 classes; 83.62% top-1 @224 (timm `maxvit_tiny_tf_224`)."""
    return _build("maxvit_tiny", rngs, overrides)


@register("maxvit_small")
def maxvit_small(*, rngs, **overrides):
    """MaxViT-S: 68,927,956 parameters; 84.45% top-1 @224 (timm `maxvit_small_tf_224`)."""
    return _build("maxvit_small", rngs, overrides)


@register("maxvit_base")
def maxvit_base(*, rngs, **overrides):
    """MaxViT-B: 119,467,708 parameters; 84.95% top-1 @224 (timm `maxvit_base_tf_224`)."""
    return _build("maxvit_base", rngs, overrides)


@register("maxvit_large")
def maxvit_large(*, rngs, **overrides):
    """MaxViT-L: 211,785,560 parameters; 85.17% top-1 @224 (timm `maxvit_large_tf_224`)."""
    return _build("maxvit_large", rngs, overrides)


@register("maxvit_pico")
def maxvit_pico(*, rngs, **overrides):
    """MaxViT-pico (ours, not in the paper): stem 16, depths 1,1,1,1, widths 16-128, head dim 8, 64 px by
    default (window = grid = 2). For tests and small-image training, e.g. 8x8 digits upscaled to 64 px; at 32 px
    pass `img_size=32` (window 1: attention degenerates to per-token, still valid)."""
    return _build("maxvit_pico", rngs, overrides)
