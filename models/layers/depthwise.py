"""Depthwise 2-D convolution with a per-platform implementation behind one function.

XLA:CPU's grouped convolution (`feature_group_count=C`) is ~40x slower than the same result written as `kh*kw`
shifted multiply-adds (platform.md: 131 ms vs 3.4 ms forward on [8, 56, 56, 256], 301 ms vs 102 ms gradient).
On GPU/TPU the grouped convolution is the fast one. The op `depthwise_conv2d` is registered with
`jaxattn.core.dispatch`: `implementation=None` gets 'shifted' in programs lowered for CPU and 'lax' (the grouped
convolution) everywhere else, decided at lowering time; both agree (tested).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.core import dispatch
from jaxattn.models.layers import axes

OP = "depthwise_conv2d"


def resolve_padding(padding, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """`'SAME'` (TensorFlow: output `ceil(size / stride)`, extra padding at the end), `'VALID'`, an int (both
    sides) or a `(lo, hi)` pair -> `(lo, hi)` for one axis."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return 0, 0
        if mode != "SAME":
            raise ValueError(f"`padding` must be 'SAME', 'VALID', an int or (lo, hi) pairs, got {padding!r}")
        out = -(-size // stride)
        total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        return total // 2, total - total // 2
    if isinstance(padding, int):
        return padding, padding
    lo, hi = padding
    return int(lo), int(hi)


def _pairs(name, value):
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"`{name}` must be an int or a pair, got {value}")
    return value


def conv_geometry(x, kernel_shape, stride, padding, dilation):
    """Checks NHWC `x` against `kernel_shape [kh, kw, 1, C]`; returns `(stride, padding, dilation)` as integer pairs,
    the padding resolved per axis to `((top, bottom), (left, right))`."""
    if x.ndim != 4:
        raise ValueError(f"`x` must be NHWC (rank 4), got shape {tuple(x.shape)}")
    kh, kw, one, c = kernel_shape
    if one != 1 or c != x.shape[-1]:
        raise ValueError(f"`kernel` must be [kh, kw, 1, C] with C = {x.shape[-1]} channels, got {tuple(kernel_shape)}")
    stride, dilation = _pairs("stride", stride), _pairs("dilation", dilation)
    per_axis = (padding, padding) if isinstance(padding, (str, int)) else tuple(padding)
    pads = tuple(resolve_padding(p, size, k, s, d) for p, size, k, s, d in
                 zip(per_axis, x.shape[1:3], (kh, kw), stride, dilation))
    return stride, pads, dilation


def depthwise_conv2d(x, kernel, *, stride=1, padding="SAME", dilation=1, implementation=None):
    """Depthwise convolution of NHWC `x` with `kernel [kh, kw, 1, C]` (channel multiplier 1); `implementation`:
    'shifted', 'lax' or None (chosen per lowering platform, see the module docstring)."""
    stride, pads, dilation = conv_geometry(x, kernel.shape, stride, padding, dilation)
    return dispatch.call(OP, implementation, lambda impl, x, kernel: impl(x, kernel, stride, pads, dilation),
                         x, kernel)


def depthwise_conv2d_lax(x, kernel, stride, padding, dilation):
    """The grouped `lax.conv_general_dilated` (`feature_group_count=C`); arguments as `depthwise_conv2d_shifted`."""
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), stride, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def depthwise_conv2d_shifted(x, kernel, stride, padding, dilation):
    """`kh*kw` strided slices of the padded input times their kernel tap, summed; `stride`, `dilation` integer pairs,
    `padding = ((top, bottom), (left, right))` resolved (`resolve_padding`)."""
    (sh, sw), (dh, dw) = stride, dilation
    kh, kw, _, c = kernel.shape
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    acc = jnp.promote_types(x.dtype, jnp.float32)  # low-precision inputs: products summed in fp32 (so are the
    kernel = kernel.astype(acc)                     # kernel's gradient sums), the result rounded once
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i * dh, j * dw, 0),
                                (xp.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                                (1, sh, sw, 1))
            term = tap.astype(acc) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out.astype(x.dtype)


dispatch.register(OP, dispatch.Backend("shifted", lambda: depthwise_conv2d_shifted, platforms=("cpu",), priority=1))
dispatch.register(OP, dispatch.Backend("lax", lambda: depthwise_conv2d_lax, platforms=None, priority=0))


class DepthwiseConv2d(nnx.Module):
    """Depthwise conv layer; parameters `kernel [kh, kw, 1, C]` (as `nnx.Conv` with `feature_group_count=C`) and
    optional `bias [C]`. PyTorch weights `[C, 1, kh, kw]` load with `w.transpose(2, 3, 1, 0)`.

    `names`: the kernel's four logical dim names (`models/layers/axes.py`), e.g. `(CONV_KERNEL, CONV_KERNEL, None,
    EMBED)`; the bias takes the last one. None leaves the parameters unnamed. The parameters are stored in
    `param_dtype` and cast to the input's dtype where used.
    """

    def __init__(self, channels: int, kernel_size=3, *, stride=1, padding="SAME", dilation=1, use_bias=True,
                 implementation=None, names=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kh, kw = _pairs("kernel_size", kernel_size)
        if names is not None and len(names) != 4:
            raise ValueError(f"`names` must name the kernel's 4 dims [kh, kw, 1, C], got {tuple(names)}")
        kernel_meta = {} if names is None else axes.param_metadata(names)
        bias_meta = {} if names is None else axes.param_metadata(tuple(names)[-1:])
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, 1, channels), param_dtype), **kernel_meta)
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), **bias_meta) if use_bias else None
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.implementation = implementation

    def __call__(self, x):
        y = depthwise_conv2d(x, self.kernel[...], stride=self.stride, padding=self.padding,
                             dilation=self.dilation, implementation=self.implementation)
        if self.bias is not None:  # added in fp32 at least: its gradient sums over the batch and the map
            acc = jnp.promote_types(y.dtype, jnp.float32)
            y = (y.astype(acc) + self.bias[...].astype(acc)).astype(y.dtype)
        return y
