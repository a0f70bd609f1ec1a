"""Registered BiFormer variants (rayleizhu/BiFormer `models/biformer.py`): n_win 7, topk 1-4-16-(-2), LCE 5x5,
3x3 depthwise conv before attention, MLP ratio 3, head dim 32, `qk_dims == embed_dims`."""
from __future__ import annotations

from flax import nnx

from jaxattn.models.registry import register

from .model import BiFormer

# name -> (depths, embed_dims)
CONFIGS = {
    "biformer_pico": ((1, 1, 2, 1), (32, 64, 96, 128)),
    "biformer_tiny": ((2, 2, 8, 2), (64, 128, 256, 512)),
    "biformer_small": ((4, 4, 18, 4), (64, 128, 256, 512)),
    "biformer_base": ((4, 4, 18, 4), (96, 192, 384, 768)),
}


# biformer_pico routes over 2x2 regions, so any image that is a multiple of 32 px works (32, 64, 224, ...).
_PICO_ROUTING = dict(n_win=2, topks=(1, 2, 4, -2))


def _build(name: str, rngs: nnx.Rngs, overrides: dict) -> BiFormer:
    depths, embed_dims = CONFIGS[name]
    kwargs = dict(depths=depths, embed_dims=embed_dims, mlp_ratios=(3, 3, 3, 3), topks=(1, 4, 16, -2),
                  head_dim=32, n_win=7, side_dwconv=5, before_attn_dwconv=3)
    if name == "biformer_pico":
        kwargs.update(_PICO_ROUTING)
    kwargs.update(overrides)
    if "qk_dims" not in overrides:
        kwargs["qk_dims"] = kwargs["embed_dims"]
    return BiFormer(rngs=rngs, **kwargs)


@register("biformer_pico")
def biformer_pico(*, rngs: nnx.Rngs, **overrides) -> BiFormer:
    """BiFormer-Pico (ours, not in the paper): depths 1-1-2-1, dims 32-64-96-128 (the reduced reference
    fixture's widths), routing over 2x2 regions with topk 1-2-4 then global attention, so images a multiple of
    32 px work. 738,568 parameters (1000 classes); for tests and small embedded training runs."""
    return _build("biformer_pico", rngs, overrides)


@register("biformer_tiny")
def biformer_tiny(*, rngs: nnx.Rngs, **overrides) -> BiFormer:
    """BiFormer-T: depths 2-2-8-2, dims 64-128-256-512. 13,142,760 params. ImageNet-1k top-1 81.4 (224)."""
    return _build("biformer_tiny", rngs, overrides)


@register("biformer_small")
def biformer_small(*, rngs: nnx.Rngs, **overrides) -> BiFormer:
    """BiFormer-S: depths 4-4-18-4, dims 64-128-256-512. 25,536,232 params. ImageNet-1k top-1 83.8 (224)."""
    return _build("biformer_small", rngs, overrides)


@register("biformer_base")
def biformer_base(*, rngs: nnx.Rngs, **overrides) -> BiFormer:
    """BiFormer-B: depths 4-4-18-4, dims 96-192-384-768. 56,804,968 params. ImageNet-1k top-1 84.3 (224)."""
    return _build("biformer_base", rngs, overrides)
