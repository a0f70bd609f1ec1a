"""Registered DiNAT variants (SHI-Labs `classification/dinat.py`). Kernel 7; dilations follow `img_size`
(`model.default_dilations`: at 224 `[1,8,1]`, `[1,4,1,4]`, `[1,2]*k`, `[1]*5`; at 384 13, 6, 3, 1)."""
from __future__ import annotations

from flax import nnx

from jaxattn.models.registry import register

from .model import DiNAT

# name -> (embed_dim, depths, num_heads, mlp_ratio, drop_path_rate, layer_scale)
CONFIGS = {
    "dinat_pico": (32, (1, 1, 2, 1), (1, 2, 4, 8), 2.0, 0.1, None),
    "dinat_mini": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3.0, 0.2, None),
    "dinat_tiny": (64, (3, 4, 18, 5), (2, 4, 8, 16), 3.0, 0.2, None),
    "dinat_small": (96, (3, 4, 18, 5), (3, 6, 12, 24), 2.0, 0.3, None),
    "dinat_base": (128, (3, 4, 18, 5), (4, 8, 16, 32), 2.0, 0.5, 1e-5),
    "dinat_large": (192, (3, 4, 18, 5), (6, 12, 24, 48), 2.0, 0.35, None),
}


def _build(name: str, rngs: nnx.Rngs, overrides: dict) -> DiNAT:
    embed_dim, depths, num_heads, mlp_ratio, drop_path_rate, layer_scale = CONFIGS[name]
    kwargs = dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads, mlp_ratio=mlp_ratio, kernel_size=7,
                  drop_path_rate=drop_path_rate, layer_scale=layer_scale)
    kwargs.update(overrides)
    return DiNAT(rngs=rngs, **kwargs)


@register("dinat_pico")
def dinat_pico(*, rngs: nnx.Rngs, **overrides) -> DiNAT:
    """DiNAT-Pico (ours, not in the paper): embed 32, depths 1-1-2-1, heads 1-2-4-8, MLP ratio 2, drop path 0.1.
    1,487,923 parameters (1000 classes); for tests and small embedded training runs (works at any image size; give
    `img_size=` so the dilations fit, e.g. 64 -> dilations 2, 1, 1, 1)."""
    return _build("dinat_pico", rngs, overrides)


@register("dinat_mini")
def dinat_mini(*, rngs: nnx.Rngs, **overrides) -> DiNAT:
    """DiNAT-Mini: embed 64, depths 3-4-6-5, heads 2-4-8-16, MLP ratio 3, drop path 0.2. 19,984,174 params.
    ImageNet-1k top-1 81.8 (224)."""
    return _build("dinat_mini", rngs, overrides)


@register("dinat_tiny")
def dinat_tiny(*, rngs: nnx.Rngs, **overrides) -> DiNAT:
    """DiNAT-Tiny: embed 64, depths 3-4-18-5, heads 2-4-8-16, MLP ratio 3, drop path 0.2. 27,901,582 params.
    ImageNet-1k top-1 82.7 (224)."""
    return _build("dinat_tiny", rngs, overrides)


@register("dinat_small")
def dinat_small(*, rngs: nnx.Rngs, **overrides) -> DiNAT:
    """DiNAT-Small: embed 96, depths 3-4-18-5, heads 3-6-12-24, MLP ratio 2, drop path 0.3. 50,719,681 params.
    ImageNet-1k top-1 83.8 (224)."""
    return _build("dinat_small", rngs, overrides)


@register("dinat_base")
def dinat_base(*, rngs: nnx.Rngs, **overrides) -> DiNAT:
    """DiNAT-Base: embed 128, depths 3-4-18-5, heads 4-8-16-32, MLP ratio 2, drop path 0.5, layer scale 1e-5.
    89,769,652 params. ImageNet-1k top-1 84.4 (224)."""
    return _build("dinat_base", rngs, overrides)


@register("dinat_large")
def dinat_large(*, rngs: nnx.Rngs, **overrides) -> DiNAT:
    """DiNAT-Large: embed 192, depths 3-4-18-5, heads 6-12-24-48, MLP ratio 2, drop path 0.35.
    200,943,514 params. ImageNet-1k top-1 86.6 (224, ImageNet-22k pre-training); `img_size=384` for the 384
    checkpoints (dilations 13, 6, 3, 1)."""
    return _build("dinat_large", rngs, overrides)
