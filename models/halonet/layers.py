"""Building blocks of HaloNet in timm's layout: conv-BN-act, stems, squeeze-excite and the halo attention layer.

Attribute names mirror timm's module names (`conv`, `bn`, `q`, `kv`, `pos_embed.height_rel`, ...) so the weight
loader can walk both trees in parallel. Images are NHWC.

Precision: parameters are stored in `param_dtype`, convs and attention run in `dtype` (None: the input's);
BatchNorm statistics and normalisation, squeeze-excite and average-pool means compute in float32 and return `dtype`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.models import context_parallel as cp
from jaxattn.models.halonet.config import AttnCfg, make_divisible
from jaxattn.models.halonet.conv import KERNEL_NAMES, Conv2d, max_pool_3x3_s2
from jaxattn.models.layers import axes
from jaxattn.models.layers.batch_norm import BatchNormVJP

ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu}
BN_EPS = 1e-5  # torch BatchNorm2d default, as in timm's BatchNormAct2d
BN_MOMENTUM = 0.9  # flax convention for torch momentum 0.1

# timm's ByobNet init: convs N(0, sqrt(2 / fan_out)), classifier N(0, 0.01).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def activation(name: str | None):
    if name is None:
        return lambda x: x
    if name not in ACTIVATIONS:
        raise ValueError(f"`act` must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class BatchNorm(BatchNormVJP):
    """`BatchNormVJP` whose statistics and normalisation are float32 in both modes (training: batch statistics via
    `batch_norm_train`; eval: the running ones), returned in `dtype` (None: the input's). `scale`, `bias` and the
    running `mean`/`var` are named `NORM`."""

    def __init__(self, chs: int, *, zero_init: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        names = axes.param_metadata((axes.NORM,))
        super().__init__(chs, momentum=BN_MOMENTUM, epsilon=BN_EPS, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, scale_init=nnx.initializers.zeros if zero_init else
                         nnx.initializers.ones, scale_metadata=names, bias_metadata=names, rngs=rngs)
        self.mean.set_metadata(**names)
        self.var.set_metadata(**names)

    def __call__(self, x, use_running_average=None, *, mask=None):
        running = self.use_running_average if use_running_average is None else use_running_average
        if not running or mask is not None:
            return super().__call__(x, running, mask=mask)
        rstd = jax.lax.rsqrt(self.var[...] + self.epsilon)
        y = (x.astype(jnp.float32) - self.mean[...]) * (rstd * self.scale[...]) + self.bias[...]
        return y.astype(self.dtype or x.dtype)


class ConvBnAct(nnx.Module):
    """timm `ConvNormAct`: bias-free conv with PyTorch symmetric padding `((s-1) + (k-1)) // 2`, BN, activation."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, *, act: str | None = "relu",
                 zero_init: bool = False, names=KERNEL_NAMES, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        pad = ((stride - 1) + (kernel_size - 1)) // 2
        self.conv = Conv2d(in_chs, out_chs, kernel_size, stride, pad, kernel_init=conv_init, names=names,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(out_chs, zero_init=zero_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act_name = act

    def __call__(self, x):
        return activation(self.act_name)(self.bn(self.conv(x)))


class Stem(nnx.Module):
    """timm `create_byob_stem` for '7x7', '3x3' and 'tiered', with or without the 3x3/2 max-pool (total stride 4,
    or 2 for a single conv without pool, as timm).

    'tiered' is three 3x3 convs of `(3c//8, c//2, c)` channels, the first strided (the last too when there is no
    pool). timm names the convs `stem.conv1..3` when the stem is a `Stem` (tiered, or pooled) and `stem.conv`/
    `stem.bn` for a single unpooled conv: `self.single` records which.
    """
    TYPES = ("7x7", "3x3", "tiered")

    def __init__(self, in_chs: int, out_chs: int, stem_type: str = "7x7", pool: bool = True, *, act: str,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if stem_type not in self.TYPES:
            raise ValueError(f"`stem_type` must be one of {self.TYPES}, got {stem_type!r}")
        if stem_type == "tiered":
            chs, kernel = (3 * out_chs // 8, out_chs // 2, out_chs), 3
            strides = [2, 1, 1 if pool else 2]
        else:
            chs, kernel, strides = (out_chs,), int(stem_type[0]), [2]
        self.single = len(chs) == 1 and not pool
        convs, prev = [], in_chs
        for ch, s in zip(chs, strides):
            convs.append(ConvBnAct(prev, ch, kernel, s, act=act, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            prev = ch
        self.convs = nnx.List(convs)
        self.pool = pool
        self.stride = 2 ** (sum(s == 2 for s in strides) + pool)
        self.out_chs = out_chs
        self.features, self.tap_index = self._features(chs, strides)

    def _features(self, chs, strides):
        """timm's stem `feature_info` as `(num_chs, reduction, module)`, the stem output last, and the index of the
        conv whose output `forward_intermediates` takes (the last one before the final stride; None: the output)."""
        if self.single:
            return ((chs[0], 2, "stem"),), None
        features, reduction, tap = [], 1, None
        for i, s in enumerate(strides):
            if i > 0 and s > 1:
                tap = i - 1
                features.append((chs[i - 1], reduction, f"stem.conv{i}"))
            reduction *= s
        last = f"stem.conv{len(chs)}"
        if self.pool:
            tap = len(chs) - 1
            features.append((chs[-1], reduction, last))
            reduction, last = reduction * 2, "stem.pool"
        return tuple(features) + ((chs[-1], reduction, last),), tap

    def __call__(self, x):
        return self.forward_intermediates(x)[0]

    def forward_intermediates(self, x):
        """`(output, feature)`: the stem output and its tapped intermediate (the output itself without a tap)."""
        feature = None
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i == self.tap_index:
                feature = x
        if self.pool:
            x = max_pool_3x3_s2(x)
        return x, x if feature is None else feature

    def prune_to_tap(self) -> None:
        """Drops the layers after the tapped conv, so the stem outputs its feature (timm's `prune_to_tap`)."""
        if self.tap_index is not None:
            self.convs = nnx.List(list(self.convs)[:self.tap_index + 1])
            self.pool, self.tap_index = False, None


class SqueezeExcite(nnx.Module):
    """timm `SEModule` defaults: reduce to `make_divisible(c / 16, 8, round_limit=0)`, ReLU, sigmoid gate."""

    def __init__(self, chs: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        rd = make_divisible(chs / 16, 8, round_limit=0.0)
        kw = dict(use_bias=True, kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Conv2d(chs, rd, **kw)
        self.fc2 = Conv2d(rd, chs, **kw)

    def __call__(self, x):
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        gate = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))).astype(jnp.float32))
        return x * gate.astype(x.dtype)


class PosEmbedRel(nnx.Module):
    """timm `PosEmbedRel` tables: `height_rel`, `width_rel` of shape `(2 * win - 1, dim_head)`, named
    `(CONV_KERNEL, HEAD_DIM)` (a relative offset within the window; replicated: every head shares them)."""

    def __init__(self, win: int, dim_head: int, std: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(std)
        names = axes.param_metadata((axes.CONV_KERNEL, axes.HEAD_DIM))
        self.height_rel = nnx.Param(init(rngs.params(), (2 * win - 1, dim_head), param_dtype), **names)
        self.width_rel = nnx.Param(init(rngs.params(), (2 * win - 1, dim_head), param_dtype), **names)


class HaloAttention(nnx.Module):
    """timm `HaloAttn` on NHWC maps: 1x1 q and kv projections, `jaxattn.halo_attention`, heads merged.

    `[B, H, W, dim] -> [B, H/stride, W/stride, dim_out]`. Queries/keys get `dim_head` (or
    `make_divisible(dim_out * qk_ratio) // num_heads`) per head, values `dim_out // num_heads`. The kv projection's
    output channels are laid out per head as `[k_head, v_head]` (timm splits them after the head reshape).
    Stride 2: queries come from a stride-2 1x1 conv (every other pixel) and each `b x b` key block holds
    `b/2 x b/2` queries; with `avg_down` or a block size not divisible by the stride, attention runs at full
    resolution and a 2x2 average pool follows (timm's fallback).

    `cfg.context_parallel='halo'`: under a mesh whose `'context'` axis is > 1, a map whose rows split into whole
    blocks per device and at least `halo_size` rows (`models/context_parallel.attention` decides)
    runs `jaxattn.context_parallel.halo_exchange_halo_attention` over image rows (neighbours exchange the
    `halo_size` border rows); other maps run the single-device op, which GSPMD gathers for. Same result either way.

    Tensor parallelism: q and kv are column-parallel (their output channels, laid out head by head, split over
    `tensor` as `CONV_OUT`: whole heads per device); q, k, v and the output are constrained per head
    `(BATCH, HEIGHT, WIDTH, HEADS, HEAD_DIM)`, so attention runs on each device's heads.
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, stride: int = 1, cfg: AttnCfg = AttnCfg(),
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        dim_out = dim_out or dim
        heads = cfg.num_heads
        if dim_out % heads:
            raise ValueError(f"attention width {dim_out} is not divisible by `num_heads` ({heads})")
        if stride not in (1, 2):
            raise ValueError(f"halo attention `stride` must be 1 or 2, got {stride}")
        self.num_heads = heads
        self.dim_head_qk = cfg.dim_head or make_divisible(dim_out * cfg.qk_ratio) // heads
        self.dim_head_v = dim_out // heads
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = cfg.scale_pos_embed
        self.block_size, self.halo_size = cfg.block_size, cfg.halo_size
        self.implementation = cfg.implementation
        self.context_parallel = cp.check_strategy(cfg.context_parallel, "halonet")
        self.avg_pool = stride > 1 and (cfg.avg_down or cfg.block_size % stride != 0)
        self.query_stride = 1 if self.avg_pool else stride
        # timm's init: q/kv truncated normal with std fan_in ** -0.5, tables with std = scale.
        proj_init = nnx.initializers.truncated_normal(dim ** -0.5)
        kw = dict(use_bias=cfg.qkv_bias, kernel_init=proj_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Conv2d(dim, heads * self.dim_head_qk, 1, self.query_stride, **kw)
        self.kv = Conv2d(dim, heads * (self.dim_head_qk + self.dim_head_v), 1, **kw)
        self.pos_embed = PosEmbedRel(cfg.block_size + 2 * cfg.halo_size, self.dim_head_qk, self.scale,
                                     param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        b, h, w, _ = x.shape
        q = self.q(x)
        q = _per_head(q.reshape(*q.shape[:3], self.num_heads, self.dim_head_qk))
        kv = self.kv(x).reshape(b, h, w, self.num_heads, self.dim_head_qk + self.dim_head_v)
        k, v = _per_head(kv[..., :self.dim_head_qk]), _per_head(kv[..., self.dim_head_qk:])
        rel_h, rel_w = self.pos_embed.height_rel[...], self.pos_embed.width_rel[...]
        if self.scale_pos_embed:  # (q.k + rel) * scale == scale * q.k + q.(scale * rel)
            rel_h, rel_w = rel_h * self.scale, rel_w * self.scale
        rel = dict(rel_height=rel_h.astype(q.dtype), rel_width=rel_w.astype(q.dtype), scale=self.scale,
                   query_stride=self.query_stride)
        out = cp.attention("halo_attention", self.context_parallel, q, k, v, self.block_size, self.halo_size,
                           implementation=self.implementation, **rel)
        out = _per_head(out)
        out = out.reshape(*out.shape[:3], self.num_heads * self.dim_head_v)
        if self.avg_pool:  # torch AvgPool2d(2, 2): floor, no padding; summed in float32
            pooled = jax.lax.reduce_window(out.astype(jnp.float32), 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                           "VALID")
            out = (pooled / 4.0).astype(out.dtype)
        return out


def _per_head(x):
    return axes.constrain(x, (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.HEADS, axes.HEAD_DIM))

