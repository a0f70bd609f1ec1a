"""MaxViT's convolutional half: the stem and the pre-norm MBConv block with squeeze-excite (timm `_tf_cfg`).

All tensors are NHWC. 1x1 convolutions are `Dense` (an `nnx.Linear` with a CPU-friendly backward) over the channel
axis; PyTorch `[out, in, 1, 1]` weights load after a reshape. Padding is TensorFlow "SAME" (stride-2 3x3 convs pad
one pixel at the bottom/right only). The depthwise conv is `DepthwiseConv2dVJP` (`DepthwiseConv2d`, fast per
platform, with a hand-written CPU backward).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import DropPath, axes
from jaxattn.models.layers.batch_norm import BatchNormVJP
from jaxattn.models.layers.dense import Dense
from jaxattn.models.layers.depthwise_vjp import DepthwiseConv2dVJP
from jaxattn.models.maxvit.attention import IMAGE, IMAGE_MLP

BN_EPS = 1e-3
# Efficientnet-style init of conv weights: normal with std sqrt(2 / fan_out) (as timm's `_init_conv`).
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
CONV_NAMES = (axes.CONV_KERNEL, axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)


def gelu(x):
    return jax.nn.gelu(x, approximate=True)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds channel counts to a multiple of `divisor`, never below 90% of `value` (timm/TF rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def mean_fp32(x, axis, **kwargs):
    """`jnp.mean` accumulated in (at least) float32, returned in `x`'s dtype."""
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=axis, **kwargs).astype(x.dtype)


def avg_pool2(x):
    """2x2 average pool, stride 2, on NHWC with even H and W (the model's size check guarantees it)."""
    b, h, w, c = x.shape
    return mean_fp32(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def batch_norm(channels, *, momentum, dtype, param_dtype, rngs):
    return BatchNormVJP(channels, names=(axes.NORM,), momentum=momentum, epsilon=BN_EPS, use_fast_variance=False,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def pointwise(din, dout, names, *, use_bias, dtype, param_dtype, rngs):
    return Dense(din, dout, names=names, use_bias=use_bias, kernel_init=CONV_INIT, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)


def conv3x3(din, dout, *, strides=1, dtype, param_dtype, rngs):
    return nnx.Conv(din, dout, (3, 3), strides=strides, padding="SAME", kernel_init=CONV_INIT, dtype=dtype,
                    param_dtype=param_dtype, kernel_metadata=axes.param_metadata(CONV_NAMES),
                    bias_metadata=axes.param_metadata(CONV_NAMES[-1:]), rngs=rngs)


class Stem(nnx.Module):
    """3x3 stride-2 conv (bias) -> BN -> GELU -> 3x3 conv (bias); output at 1/2 resolution."""

    def __init__(self, in_chans: int, widths: tuple[int, int], *, bn_momentum: float, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv3x3(in_chans, widths[0], strides=2, **kw)
        self.norm1 = batch_norm(widths[0], momentum=bn_momentum, **kw)
        self.conv2 = conv3x3(widths[0], widths[1], **kw)

    def __call__(self, x):
        return self.conv2(gelu(self.norm1(self.conv1(x))))


class SqueezeExcite(nnx.Module):
    """`x * sigmoid(fc2(silu(fc1(mean_hw(x)))))` on the MBConv's hidden channels (split over `tensor`: fc1 by
    rows, fc2 by columns; the reduced width stays whole)."""

    def __init__(self, channels: int, reduced: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = pointwise(channels, reduced, (axes.MLP, None), **kw)
        self.fc2 = pointwise(reduced, channels, (None, axes.MLP), **kw)

    def __call__(self, x):
        s = mean_fp32(x, axis=(1, 2), keepdims=True)
        return x * jax.nn.sigmoid(self.fc2(jax.nn.silu(self.fc1(s))))


class MBConv(nnx.Module):
    """Pre-norm inverted bottleneck: `shortcut(x) + drop_path(proj(SE(GELU(BN(dw(GELU(BN(expand(BN(x))))))))))`.

    `mid = make_divisible(out * expand_ratio)`; SE reduces to `int(se_ratio * out)`. With `stride=2` the
    depthwise conv strides and the shortcut is a 2x2 average pool followed by a 1x1 conv (with bias) when the
    width changes. The hidden (`mid`) channels split over `tensor` like an MLP's (expand by columns, project by
    rows).
    """

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, expand_ratio: float = 4.0,
                 se_ratio: float = 0.25, drop_path: float = 0.0, bn_momentum: float = 0.99,
                 dw_implementation=None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if stride not in (1, 2):
            raise ValueError(f"`stride` must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"a stride-1 MBConv keeps its width, got {in_chs} -> {out_chs}")
        mid = make_divisible(out_chs * expand_ratio)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(momentum=bn_momentum, **kw)
        self.stride = stride
        self.shortcut_expand = (pointwise(in_chs, out_chs, (axes.EMBED, axes.EMBED), use_bias=True, **kw)
                                if stride == 2 and in_chs != out_chs else None)
        self.pre_norm = batch_norm(in_chs, **bn)
        self.conv1_1x1 = pointwise(in_chs, mid, (axes.EMBED, axes.MLP), use_bias=False, **kw)
        self.norm1 = batch_norm(mid, **bn)
        self.conv2_kxk = DepthwiseConv2dVJP(mid, 3, stride=stride, padding="SAME", use_bias=False,
                                            names=(axes.CONV_KERNEL, axes.CONV_KERNEL, None, axes.MLP),
                                            param_dtype=param_dtype, implementation=dw_implementation, rngs=rngs)
        self.norm2 = batch_norm(mid, **bn)
        self.se = SqueezeExcite(mid, int(se_ratio * out_chs), **kw)
        self.conv3_1x1 = pointwise(mid, out_chs, (axes.MLP, axes.EMBED), use_bias=True, **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        shortcut = x
        if self.stride == 2:
            shortcut = avg_pool2(shortcut)
            if self.shortcut_expand is not None:
                shortcut = self.shortcut_expand(shortcut)
        x = axes.constrain(gelu(self.norm1(self.conv1_1x1(self.pre_norm(x)))), IMAGE_MLP)
        x = axes.constrain(gelu(self.norm2(self.conv2_kxk(x))), IMAGE_MLP)
        x = self.conv3_1x1(self.se(x))
        return axes.constrain(self.drop_path(x) + shortcut, IMAGE)
