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

from jaxattn.models.layers import DropPath
from jaxattn.models.layers.batch_norm import BatchNormVJP
from jaxattn.models.layers.dense import Dense
from jaxattn.models.layers.depthwise_vjp import DepthwiseConv2dVJP

BN_EPS = 1e-3
# Efficientnet-style init of conv weights: normal with std sqrt(2 / fan_out) (as timm's `_init_conv`).
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def gelu(x):
    return jax.nn.gelu(x, approximate=True)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds channel counts to a multiple of `divisor`, never below 90% of `value` (timm/TF rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def avg_pool2(x):
    """2x2 average pool, stride 2, on NHWC with even H and W (the model's size check guarantees it)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def batch_norm(channels, *, momentum, dtype, param_dtype, rngs):
    return BatchNormVJP(channels, momentum=momentum, epsilon=BN_EPS, use_fast_variance=False, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)


def pointwise(din, dout, *, use_bias, dtype, param_dtype, rngs):
    return Dense(din, dout, use_bias=use_bias, kernel_init=CONV_INIT, dtype=dtype, param_dtype=param_dtype,
                 rngs=rngs)


class Stem(nnx.Module):
    """3x3 stride-2 conv (bias) -> BN -> GELU -> 3x3 conv (bias); output at 1/2 resolution."""

    def __init__(self, in_chans: int, widths: tuple[int, int], *, bn_momentum: float, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(in_chans, widths[0], (3, 3), strides=2, padding="SAME", kernel_init=CONV_INIT, **kw)
        self.norm1 = batch_norm(widths[0], momentum=bn_momentum, **kw)
        self.conv2 = nnx.Conv(widths[0], widths[1], (3, 3), padding="SAME", kernel_init=CONV_INIT, **kw)

    def __call__(self, x):
        return self.conv2(gelu(self.norm1(self.conv1(x))))


class SqueezeExcite(nnx.Module):
    """`x * sigmoid(fc2(silu(fc1(mean_hw(x)))))`."""

    def __init__(self, channels: int, reduced: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = pointwise(channels, reduced, **kw)
        self.fc2 = pointwise(reduced, channels, **kw)

    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * jax.nn.sigmoid(self.fc2(jax.nn.silu(self.fc1(s))))


class MBConv(nnx.Module):
    """Pre-norm inverted bottleneck: `shortcut(x) + drop_path(proj(SE(GELU(BN(dw(GELU(BN(expand(BN(x))))))))))`.

    `mid = make_divisible(out * expand_ratio)`; SE reduces to `int(se_ratio * out)`. With `stride=2` the
    depthwise conv strides and the shortcut is a 2x2 average pool followed by a 1x1 conv (with bias) when the
    width changes.
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
        self.shortcut_expand = (pointwise(in_chs, out_chs, use_bias=True, **kw)
                                if stride == 2 and in_chs != out_chs else None)
        self.pre_norm = batch_norm(in_chs, **bn)
        self.conv1_1x1 = pointwise(in_chs, mid, use_bias=False, **kw)
        self.norm1 = batch_norm(mid, **bn)
        self.conv2_kxk = DepthwiseConv2dVJP(mid, 3, stride=stride, padding="SAME", use_bias=False,
                                         implementation=dw_implementation, rngs=rngs)
        self.norm2 = batch_norm(mid, **bn)
        self.se = SqueezeExcite(mid, int(se_ratio * out_chs), **kw)
        self.conv3_1x1 = pointwise(mid, out_chs, use_bias=True, **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        shortcut = x
        if self.stride == 2:
            shortcut = avg_pool2(shortcut)
            if self.shortcut_expand is not None:
                shortcut = self.shortcut_expand(shortcut)
        x = gelu(self.norm1(self.conv1_1x1(self.pre_norm(x))))
        x = gelu(self.norm2(self.conv2_kxk(x)))
        x = self.conv3_1x1(self.se(x))
        return self.drop_path(x) + shortcut
