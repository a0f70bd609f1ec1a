"""Registered HaloNet variants: the paper's H0-H7, timm's hybrids (`halonet26t`, `halonet50ts`,
`sehalonet33ts`) and `halonet_pico` for tests and embedded training.

H0-H7 (paper Table: block b, halo h, value multiplier rv, output multiplier rb, stage-3 depth l3, final 1x1 width
df) are built as all-attention networks: 7x7/2 stem (64) + 3x3/2 max-pool, stages of depth [3, 3, l3, 3] whose
first block (stages 2-4) is a stride-2 halo block, and in stage i (base width 64 * 2^i):

    1x1 conv to base  ->  halo attention (q, k: base channels; values/output: rv * base)  ->  BN + ReLU
    ->  1x1 conv to rb * base  ->  + shortcut

then an optional final 1x1 conv-BN-ReLU to df channels, average pool and the classifier. 8 heads everywhere (as
timm). This reading is the one that reproduces every published size; with rv = rb = 1 it is exactly timm's
`halonet_h1` (8,100,056). The alternative readings checked (rv widening q/k as well, or rv setting the block
width) miss H5-H7 by 70-200%. Parameter counts (1000 classes):

    variant  b   h  rv   rb    l3  df    px   ours        paper   diff
    H0       8   3  1.0  0.5   7   -     256  5,500,952   5.5M   +0.02%
    H1       8   3  1.0  1.0   10  -     256  8,100,056   8.1M    0.00% (= timm halonet_h1)
    H2       8   3  1.0  1.25  11  -     256  9,404,312   9.4M   +0.05%
    H3       10  3  1.0  1.5   12  1024  320  11,841,304  11.8M  +0.35%
    H4       12  2  1.0  3.0   12  1280  384  19,101,976  19.1M  +0.01%
    H5       14  2  2.5  2.0   23  1536  448  30,717,272  30.7M  +0.06%
    H6       8   4  3.0  2.75  24  1536  512  43,456,792  43.4M  +0.13%
    H7       10  3  4.0  3.5   26  2048  640  67,433,240  67.4M  +0.05%

H7 was evaluated at 600 px in the paper, but 600 does not fit its blocks (the stage-3 map would be 75 px, not a
multiple of 10; timm would refuse it too), so its default size is 640, the nearest that fits; the parameter
count does not depend on it.
"""
from __future__ import annotations

from flax import nnx

from jaxattn.models.halonet.config import AttnCfg, interleave, stage, with_context_parallel
from jaxattn.models.halonet.model import HaloNet
from jaxattn.models.registry import register

PAPER = {  # name: (block, halo, rv, rb, l3, df, img_size)
    "halonet_h0": (8, 3, 1.0, 0.5, 7, 0, 256),
    "halonet_h1": (8, 3, 1.0, 1.0, 10, 0, 256),
    "halonet_h2": (8, 3, 1.0, 1.25, 11, 0, 256),
    "halonet_h3": (10, 3, 1.0, 1.5, 12, 1024, 320),
    "halonet_h4": (12, 2, 1.0, 3.0, 12, 1280, 384),
    "halonet_h5": (14, 2, 2.5, 2.0, 23, 1536, 448),
    "halonet_h6": (8, 4, 3.0, 2.75, 24, 1536, 512),
    "halonet_h7": (10, 3, 4.0, 3.5, 26, 2048, 640),
}


def _build(rngs: nnx.Rngs, defaults: dict, overrides: dict) -> HaloNet:
    """`overrides` may hold `context_parallel` ('halo' or None): it is set on every halo attention layer."""
    overrides = dict(overrides)
    strategy = overrides.pop("context_parallel", None)
    kwargs = {**defaults, **overrides}
    return HaloNet(**(with_context_parallel(kwargs, strategy) if strategy else kwargs), rngs=rngs)


def paper_config(block: int, halo: int, rv: float, rb: float, l3: int, df: int, img_size: int,
                 base=(64, 128, 256, 512), depths=(3, 3, None, 3), num_heads: int = 8) -> dict:
    """Constructor arguments of a paper-style all-attention HaloNet (see the module docstring)."""
    depths = tuple(l3 if d is None else d for d in depths)
    stages = [stage("self_attn", d, round(c * rb), 1 if i == 0 else 2, bottle_ratio=1 / rb, value_ratio=rv)
              for i, (d, c) in enumerate(zip(depths, base))]
    return dict(stages=stages, stem_type="7x7", stem_chs=64, stem_pool=True, act="relu", num_features=df,
                attn=AttnCfg(block_size=block, halo_size=halo, num_heads=num_heads, qk_ratio=1 / rv),
                img_size=img_size)


def _register_paper(name: str):
    def builder(*, rngs: nnx.Rngs, **overrides) -> HaloNet:
        return _build(rngs, paper_config(*PAPER[name]), overrides)

    b, h, rv, rb, l3, df, px = PAPER[name]
    builder.__name__ = name
    builder.__doc__ = (f"HaloNet-{name[-2:].upper()} (paper): block {b}, halo {h}, rv {rv}, rb {rb}, stage depths "
                       f"[3, 3, {l3}, 3], final 1x1 {df or 'none'}, {px} px. Derivation: module docstring.")
    register(name)(builder)


for _name in PAPER:
    _register_paper(_name)


def halonet26t_config() -> dict:
    """timm `halonet26t`: ResNet-26-T (tiered stem), halo attention in the last two stages (b 8, h 2)."""
    return dict(
        stages=[stage("bottle", 2, 256, 1, 0.25), stage("bottle", 2, 512, 2, 0.25),
                interleave(("bottle", "self_attn"), 2, 1024, 2, 0.25), stage("self_attn", 2, 2048, 2, 0.25)],
        stem_type="tiered", stem_chs=64, stem_pool=True, act="relu", attn=AttnCfg(block_size=8, halo_size=2),
        img_size=256)


@register("halonet26t")
def halonet26t(*, rngs: nnx.Rngs, **overrides) -> HaloNet:
    """timm `halonet26t` (12,480,288 params): tiered stem + max-pool, bottlenecks [2, 2], then [bottle, halo] and
    [halo, halo] with block 8, halo 2, 8 heads, ReLU; 256 px (sides must be multiples of 256)."""
    return _build(rngs, halonet26t_config(), overrides)


@register("halonet50ts")
def halonet50ts(*, rngs: nnx.Rngs, **overrides) -> HaloNet:
    """timm `halonet50ts` (22,733,280 params): ResNet-50-T with SiLU; halo blocks (b 8, h 3) at the end of stage 2
    (4 heads), interleaved in stage 3 (blocks 1, 3, 5) and in the middle of stage 4; 256 px."""
    pair = ("bottle", "self_attn")
    defaults = dict(
        stages=[stage("bottle", 3, 256, 1, 0.25),
                interleave(pair, 4, 512, 2, 0.25, every=4, attn=AttnCfg(block_size=8, halo_size=3, num_heads=4)),
                interleave(pair, 6, 1024, 2, 0.25), interleave(pair, 3, 2048, 2, 0.25)],
        stem_type="tiered", stem_chs=64, stem_pool=True, act="silu", attn=AttnCfg(block_size=8, halo_size=3),
        img_size=256)
    return _build(rngs, defaults, overrides)


@register("sehalonet33ts")
def sehalonet33ts(*, rngs: nnx.Rngs, **overrides) -> HaloNet:
    """timm `sehalonet33ts` (13,691,712 params): tiered stem without pool, SiLU, squeeze-excite in bottlenecks,
    one halo block (b 8, h 3) at the end of stages 2 and 3, two in stage 4 (1536 ch), final 1x1 to 1280; 256 px."""
    pair = ("bottle", "self_attn")
    defaults = dict(
        stages=[stage("bottle", 2, 256, 1, 0.25), interleave(pair, 3, 512, 2, 0.25, every=[2]),
                interleave(pair, 3, 1024, 2, 0.25, every=[2]), stage("self_attn", 2, 1536, 2, 0.333)],
        stem_type="tiered", stem_chs=64, stem_pool=False, act="silu", num_features=1280, se_bottleneck=True,
        attn=AttnCfg(block_size=8, halo_size=3), img_size=256)
    return _build(rngs, defaults, overrides)


@register("halonet_pico")
def halonet_pico(*, rngs: nnx.Rngs, **overrides) -> HaloNet:
    """A tiny all-attention HaloNet for tests and embedded training: 7x7 stem (16), one halo block per stage
    (widths 32-64-96-128, the last three strided), 2 heads, block 4, halo 1, 64 px (sides must be multiples of 64;
    pass `img_size` and `attn=AttnCfg(block_size=2, ...)` for smaller images)."""
    defaults = dict(
        stages=[stage("self_attn", 1, c, 1 if i == 0 else 2) for i, c in enumerate((32, 64, 96, 128))],
        stem_type="7x7", stem_chs=16, stem_pool=True, act="relu",
        attn=AttnCfg(block_size=4, halo_size=1, num_heads=2), img_size=64, drop_path_rate=0.05)
    return _build(rngs, defaults, overrides)
