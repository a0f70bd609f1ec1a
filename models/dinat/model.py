"""DiNAT / NAT (Hassani et al. 2022): a hierarchical transformer of (dilated) neighborhood attention blocks.

Layout and names follow SHI-Labs/Neighborhood-Attention-Transformer `classification/nat.py` with natten 0.14's
`NeighborhoodAttention2D`, so reference state dicts map one to one (see `convert.py`):

    patch_embed: conv 3x3 s2 (C/2) -> conv 3x3 s2 (C), no activation between -> LayerNorm
    levels[i].blocks[j]: x + DropPath(g1 * NA(LN(x))); x + DropPath(g2 * MLP(LN(x)))   (g = layer scale or 1)
    levels[i].downsample (i < last): conv 3x3 s2 to 2C, no bias -> LayerNorm
    norm -> mean over H, W -> head (Linear)

Pods (WORKSPACE, "Pods"): every parameter names its dims (`models/layers/axes.py`); attention's qkv kernel is
`[C, 3, heads, head_dim]` and its output projection `[heads, head_dim, C]`, so `tensor` splits heads (and the MLP's
hidden units) Megatron-style, one all-reduce after each of proj and fc2. A stage's blocks run in `Stack`s, scanned
over stacked parameters (`scan_blocks=True`) or unrolled; each unit (a pair of blocks of alternating dilation, see
`stacking.py`) under the remat policy `remat`. `dtype` is the compute dtype; norms, the pooling mean and the
head's logits are float32.

Images are NHWC; tokens stay `[B, H, W, C]` throughout. Any input size works: the convolutions round up
(`ceil(H / 2)` per stride), and an attention layer whose map is smaller than its window `k * dilation` zero-pads
the normed tokens right/bottom before the qkv projection and crops after, as the reference does.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.core import validation
from jaxattn.models import context_parallel as cp
from jaxattn.models.features import Backbone, FeatureSpec
from jaxattn.models.dinat import stacking
from jaxattn.models.dinat.layers import (IMAGE, PER_HEAD, ConvDownsampler, ConvTokenizer, Mlp, Projection,
                                         dropout, layer_norm, linear, scale_fp32, trunc_normal_02)
from jaxattn.models.layers import DropPath, axes, drop_path_rates
from jaxattn.models.layers.precision import check_dtype
from jaxattn.models.layers.remat import check_remat
from jaxattn.models.layers.stack import Stack


def default_dilations(img_size: int, depths: Sequence[int], kernel_size: int) -> list[list[int]]:
    """DiNAT's rule: blocks alternate NA (dilation 1) and DiNA with dilation `max(1, resolution // kernel)`,
    where a stage's resolution is `img_size / 4 / 2**stage` (224, k=7: 8, 4, 2, 1; 384: 13, 6, 3, 1)."""
    out = []
    for stage, depth in enumerate(depths):
        resolution = -(-img_size // (4 * 2 ** stage))
        dilated = max(1, resolution // kernel_size)
        out.append([1 if j % 2 == 0 else dilated for j in range(depth)])
    return out


class NeighborhoodAttention2D(nnx.Module):
    """natten 0.14 `NeighborhoodAttention2D`: qkv Linear, (dilated) NA with a relative position bias, proj Linear.

    `rpb [heads, 2k-1, 2k-1]`; `qkv.kernel [C, 3, heads, head_dim]` (the reference's `[3C, C]` weight, transposed
    and reshaped), `proj.kernel [heads, head_dim, C]`. The reference scales q by `head_dim ** -0.5` before the QK
    product and adds rpb to the scaled logits; the op is called with the pre-scaled q and `scale=1.0` to reproduce
    exactly that.

    `context_parallel='halo'`: under a mesh whose `'context'` axis is > 1, a map whose rows split into shards that
    hold the border rows a window needs runs `jaxattn.context_parallel.halo_neighborhood_attention` over image rows
    (neighbours exchange those rows); any other map (a deep stage with few rows) runs the single-device op, which
    GSPMD gathers for. Same result either way (`models/context_parallel.attention` decides).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, *, qkv_bias: bool = True,
                 qk_scale: float | None = None, proj_drop: float = 0.0, implementation: str | None = None,
                 context_parallel: str | None = None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation
        self.scale = qk_scale or self.head_dim ** -0.5
        self.implementation = implementation
        self.context_parallel = cp.check_strategy(context_parallel, "dinat")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        heads = (self.num_heads, self.head_dim)
        self.qkv = Projection((dim,), (3, *heads), (axes.EMBED, None, axes.HEADS, axes.HEAD_DIM), use_bias=qkv_bias,
                              **kw)
        window = (num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
        self.rpb = nnx.Param(trunc_normal_02(rngs.params(), window, param_dtype),
                             **axes.param_metadata((axes.HEADS, None, None)))
        self.proj = Projection(heads, (dim,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), **kw)
        self.proj_drop = dropout(proj_drop, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        pad_h, pad_w = max(0, self.window_size - h), max(0, self.window_size - w)
        if pad_h or pad_w:  # before qkv, as the reference: padded tokens carry the qkv bias, not zeros
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = h + pad_h, w + pad_w
        qkv = self.qkv(x)  # [b, hp, wp, 3, heads, head_dim]
        q, k, v = (axes.constrain(qkv[..., i, :, :], PER_HEAD) for i in range(3))
        q = q * jnp.asarray(self.scale, q.dtype)
        rpb = self.rpb[...].astype(q.dtype)
        out = cp.attention("neighborhood_attention", self.context_parallel, q, k, v, self.kernel_size,
                           dilation=self.dilation, rpb=rpb, scale=1.0, implementation=self.implementation)
        out = axes.constrain(out[:, :h, :w], PER_HEAD)
        return self.proj_drop(self.proj(out))


class NATLayer(nnx.Module):
    """Pre-norm transformer block; `layer_scale` (a float) adds per-channel gains `gamma1`, `gamma2`."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, *, mlp_ratio: float,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: float | None = None, implementation: str | None = None,
                 context_parallel: str | None = None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, **kw)
        self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation, qkv_bias=qkv_bias,
                                            qk_scale=qk_scale, proj_drop=drop, implementation=implementation,
                                            context_parallel=context_parallel, **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, **kw)
        if layer_scale is not None:
            gain = lambda: nnx.Param(jnp.full((dim,), layer_scale, param_dtype),  # noqa: E731
                                     **axes.param_metadata((axes.NORM,)))
            self.gamma1, self.gamma2 = gain(), gain()
        else:
            self.gamma1 = self.gamma2 = nnx.data(None)

    def __call__(self, x):
        y = self.attn(self.norm1(x))
        if self.gamma1 is not None:
            y = scale_fp32(y, self.gamma1)
        x = x + self.drop_path(y)
        y = self.mlp(self.norm2(x))
        if self.gamma2 is not None:
            y = scale_fp32(y, self.gamma2)
        return axes.constrain(x + self.drop_path(y), IMAGE)


class NATUnit(nnx.Module):
    """Consecutive blocks of static dilations `dilations` (a `Stack`'s unit: DiNAT's pair NA, DiNA).
    `drop_paths`: their rates, Python floats or (in a scanned `Stack`) a traced `[len(dilations)]` array."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilations: Sequence[int], drop_paths, *,
                 rngs: nnx.Rngs, **block_args):
        self.blocks = nnx.List([NATLayer(dim, num_heads, kernel_size, d, drop_path=drop_paths[k], rngs=rngs,
                                         **block_args) for k, d in enumerate(dilations)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _make_unit(dim, num_heads, kernel_size, dilations, rngs, unit_rates, **block_args):
    return NATUnit(dim, num_heads, kernel_size, dilations, unit_rates, rngs=rngs, **block_args)


class NATLevel(nnx.Module):
    """One stage: `len(dilations)` blocks in `segments` (`Stack`s of units, `stacking.segment_plan`), then the
    downsampler unless it is the last stage."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilations: Sequence[int],
                 drop_paths: Sequence[float], *, downsample: bool, scan: bool = True, remat: str = "none",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs, **block_args):
        self.plan = stacking.segment_plan(dilations)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        segments, start = [], 0
        for unit, n in self.plan:
            rates = [list(drop_paths[start + u * len(unit):start + (u + 1) * len(unit)]) for u in range(n)]
            start += n * len(unit)

            make = functools.partial(_make_unit, dim, num_heads, kernel_size, unit, **kw, **block_args)
            if not any(map(any, rates)):  # zero rates stay Python floats: no DropPath rng, nothing traced
                make = functools.partial(make, unit_rates=(0.0,) * len(unit))
                rates = None
            segments.append(Stack(make, n, rngs=rngs, scan=scan, remat=remat,
                                  block_args=() if rates is None else (rates,)))
        self.segments = nnx.List(segments)
        self.downsample = ConvDownsampler(dim, rngs=rngs, **kw) if downsample else nnx.data(None)

    def run_blocks(self, x):
        for segment in self.segments:
            x = segment(x)
        return x

    def __call__(self, x):
        x = self.run_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class DiNAT(Backbone, nnx.Module):
    """DiNAT (NAT when every dilation is 1). NHWC images `[B, H, W, in_chans]` -> logits `[B, num_classes]`
    (pooled features `[B, embed_dim * 2**(stages-1)]` when `num_classes == 0`).

    Args:
      embed_dim, depths, num_heads, mlp_ratio, kernel_size: the architecture (stage i has `embed_dim * 2**i`
        channels and `num_heads[i]` heads).
      dilations: per stage, one dilation per block; None derives DiNAT's pattern from `img_size`
        (`default_dilations`). All ones gives NAT.
      img_size: the resolution the dilations are chosen for. Other input sizes run too (small maps are padded).
      layer_scale: initial value of the per-channel residual gains (None: no gains, as all but DiNAT-Base).
      drop_rate: dropout after the stem, on the attention projection and in the MLP; drop_path_rate: stochastic
        depth, linear in block index from 0. Both only in training mode (`model.train()`, the default).
      implementation: passed to `jaxattn.neighborhood_attention` (None picks per platform).
      context_parallel: 'halo' or None: context parallelism over image rows in training under a mesh with
        `'context'` > 1 (see `NeighborhoodAttention2D`; `jaxattn.models.context_parallel`).
      scan_blocks: run each stage's repeated blocks as a `jax.lax.scan` over stacked parameters (one unit
        compiled per segment); False unrolls them, with per-unit names (`stacking.to_per_block` maps either
        layout to the reference's per-block names).
      remat: rematerialisation policy of each unit of blocks (`models/layers/remat.POLICIES`).
      dtype: computation dtype (None: float32); norms, the pooling mean and the logits stay float32.
      param_dtype: storage dtype of the parameters (float32).

    As a backbone (`jaxattn.models.features`): one feature per stage, `levels.{i}.blocks`, the output of the
    stage's blocks before its downsampler (strides 4, 8, 16, 32), where the official detection and segmentation
    backbones tap it (they add a LayerNorm per output, `norm{i}`, trained with the detector: not part of this
    model). `norm=True` applies the final LayerNorm to the last stage's feature.
    """
    norm_attr, head_attr = ("norm", "norm."), ("head", "head.")

    def __init__(self, *, embed_dim: int = 64, depths: Sequence[int] = (3, 4, 6, 5),
                 num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio: float = 3.0, kernel_size: int = 7,
                 dilations: Sequence[Sequence[int]] | None = None, img_size: int = 224, in_chans: int = 3,
                 num_classes: int = 1000, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.2, layer_scale: float | None = None,
                 implementation: str | None = None, context_parallel: str | None = None, scan_blocks: bool = True,
                 remat: str = "none", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        remat = check_remat(remat)
        dtype, param_dtype = check_dtype("dtype", dtype, allow_none=True), check_dtype("param_dtype", param_dtype)
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(n) for n in num_heads)
        _check_config(embed_dim, depths, num_heads, kernel_size, img_size, in_chans, num_classes)
        context_parallel = cp.check_strategy(context_parallel, "dinat")
        if dilations is None:
            dilations = default_dilations(img_size, depths, kernel_size)
        dilations = [list(map(int, d)) for d in dilations]
        if len(dilations) != len(depths) or any(len(d) != n for d, n in zip(dilations, depths)):
            raise ValueError(f"`dilations` must give one dilation per block of each stage (depths {list(depths)}), "
                             f"got {dilations}")
        if any(d < 1 for stage in dilations for d in stage):
            raise ValueError(f"`dilations` must be >= 1, got {dilations}")
        self.in_chans, self.num_classes, self.img_size = in_chans, num_classes, img_size
        self.dilations, self.context_parallel = dilations, context_parallel
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.scan_blocks = bool(scan_blocks)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.patch_embed = ConvTokenizer(in_chans, embed_dim, **kw)
        self.pos_drop = dropout(drop_rate, rngs)
        rates = drop_path_rates(drop_path_rate, depths)
        self.levels = nnx.List([
            NATLevel(embed_dim * 2 ** i, num_heads[i], kernel_size, dilations[i], rates[i],
                     downsample=i < len(depths) - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                     drop=drop_rate, layer_scale=layer_scale, implementation=implementation,
                     context_parallel=context_parallel, scan=self.scan_blocks, remat=remat, **kw)
            for i in range(len(depths))])
        self.norm = layer_norm(self.num_features, **kw)
        self.head = (linear(self.num_features, num_classes, (axes.EMBED, axes.VOCAB),
                             preferred_element_type=jnp.float32, **kw) if num_classes > 0 else nnx.data(None))
        self.feature_specs = tuple(FeatureSpec(embed_dim * 2 ** i, 4 * 2 ** i, f"levels.{i}.blocks", i)
                                   for i in range(len(depths)))

    def check_images(self, x) -> None:
        """Any NHWC float image with `in_chans` channels fits (small maps are padded up to the window)."""
        validation.check_rank("x", x, 4, "[batch, height, width, channels]")
        validation.check_floating("x", x)
        validation.check_dim("x", x, -1, self.in_chans, "channels", "`in_chans`")

    def forward_features(self, x):
        """NHWC images -> pooled features `[B, num_features]` (after the final LayerNorm)."""
        self.check_images(x)
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return self.norm(x).astype(jnp.float32).mean(axis=(1, 2))

    def _taps(self):
        def run(i, level):
            def tap(x):
                if i == 0:
                    x = self.pos_drop(self.patch_embed(x))
                x = level.run_blocks(x)
                return (x if level.downsample is None else level.downsample(x)), x
            return tap
        return [run(i, level) for i, level in enumerate(self.levels)]

    def _prune(self, num_taps: int) -> list[str]:
        removed = [f"levels.{i}." for i in range(num_taps, len(self.levels))]
        self.levels = nnx.List(list(self.levels)[:num_taps])
        last = self.levels[-1]
        if last.downsample is not None:  # the last feature is taken before it
            last.downsample = nnx.data(None)
            removed.append(f"levels.{num_taps - 1}.downsample.")
        return removed

    def __call__(self, x):
        x = self.forward_features(x)
        return x if self.head is None else self.head(x)


def _check_config(embed_dim, depths, num_heads, kernel_size, img_size, in_chans, num_classes):
    if not depths or len(num_heads) != len(depths):
        raise ValueError(f"`depths` {list(depths)} and `num_heads` {list(num_heads)} need one entry per stage")
    if embed_dim < 2:
        raise ValueError(f"`embed_dim` must be >= 2 (the stem's first conv has embed_dim // 2), got {embed_dim}")
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2 ** i
        if heads < 1 or dim % heads:
            raise ValueError(f"stage {i}: width {dim} is not divisible by `num_heads[{i}]` = {heads}")
    if any(d < 1 for d in depths):
        raise ValueError(f"`depths` must be >= 1, got {list(depths)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be odd (the relative position bias is centred), got {kernel_size}")
    if img_size < 1 or in_chans < 1 or num_classes < 0:
        raise ValueError(f"`img_size` ({img_size}) and `in_chans` ({in_chans}) must be >= 1, `num_classes` "
                         f"({num_classes}) >= 0")
