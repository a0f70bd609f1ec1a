"""Shifted multiply-add depthwise convolution with a hand-written VJP (for XLA:CPU), and a layer using it.

Under autodiff, `depthwise_conv2d(implementation="shifted")` keeps its `kh*kw` shifted input copies as residuals
and builds the input gradient from `kh*kw` pads of the cotangent summed in one large fused loop. Here the input
gradient is itself a shifted depthwise conv (of the stride-dilated cotangent, kernel flipped) and the kernel
gradient one multiply-reduce per tap. Measured on a MaxViT MBConv train step (batch 8, 256 mid channels):
-18% at stride 2 (112 px), -10% at stride 1 (56 px). With stride > 1 (undilated) the input gradient is computed
per output phase (`_strided_input_grad`): 57 -> 9 ms CPU for the dx of a stride-2 3x3 conv on [8, 112, 112, 256] (one thread).

`shifted_depthwise_conv2d(x, kernel, stride, padding, dilation)`: NHWC `x`, `kernel [kh, kw, 1, C]`, integer
pairs, `padding = ((top, bottom), (left, right))` already resolved (`resolve_padding`); the same values as
`depthwise_conv2d(..., implementation="shifted")`. `DepthwiseConv2dVJP`: `DepthwiseConv2d` (same parameters,
same loaders) whose shifted path uses it, through the dispatch op `depthwise_conv2d_vjp` ('shifted' in programs
lowered for CPU, 'lax' elsewhere, as `depthwise_conv2d`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.core import dispatch
from jaxattn.models.layers import axes
from jaxattn.models.layers.depthwise import DepthwiseConv2d, conv_geometry, depthwise_conv2d_lax

OP = "depthwise_conv2d_vjp"


def _taps_sum(xp, kernel, stride, dilation, out_hw):
    """`sum_{i,j} xp[:, i*dh + s*y, j*dw + s*x] * kernel[i, j]` over the `(ho, wo)` output grid."""
    kh, kw = kernel.shape[:2]
    (sh, sw), (dh, dw), (ho, wo) = stride, dilation, out_hw
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i * dh, j * dw, 0),
                                (xp.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, xp.shape[3]),
                                (1, sh, sw, 1))
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _pad(x, pads, interior=(0, 0)):
    """`lax.pad` of H and W by `(lo, hi)` pairs (negative crops), with `interior` zeros between rows/columns."""
    zero = jnp.zeros((), x.dtype)
    return jax.lax.pad(x, zero, ((0, 0, 0), (*pads[0], interior[0]), (*pads[1], interior[1]), (0, 0, 0)))


def _out_hw(x_hw, kernel_hw, stride, padding, dilation):
    return tuple((size + lo + hi - (k - 1) * d - 1) // s + 1
                 for size, k, s, (lo, hi), d in zip(x_hw, kernel_hw, stride, padding, dilation))


def _forward(x, kernel, stride, padding, dilation):
    kernel = kernel.astype(x.dtype)
    out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], stride, padding, dilation)
    return _taps_sum(_pad(x, padding), kernel, stride, dilation, out_hw)


def _strided_input_grad(g, k, stride, padding, x_hw):
    """Input gradient of a strided, undilated conv by phases: padded row `p = s*m + r` only receives taps
    `i = r + s*t`, from `g[m - t]`. Each phase is a small stride-1 sum at output resolution (the dilated-cotangent
    route multiplies `s*s` times more zeros); the phases are then interleaved and the padding cropped."""
    kh, kw = k.shape[:2]
    (sh, sw), ((top, bottom), (left, right)) = stride, padding
    mh, mw = -(-(x_hw[0] + top + bottom) // sh), -(-(x_hw[1] + left + right) // sw)
    th, tw = -(-kh // sh) - 1, -(-kw // sw) - 1  # most taps per phase, minus one: the cotangent's top/left pad
    g_ext = _pad(g, ((th, mh - g.shape[1]), (tw, mw - g.shape[2])))
    rows = []
    for rh in range(sh):
        cols = []
        for rw in range(sw):
            phase = None
            for i in range(rh, kh, sh):
                for j in range(rw, kw, sw):
                    oi, oj = th - (i - rh) // sh, tw - (j - rw) // sw
                    term = g_ext[:, oi:oi + mh, oj:oj + mw] * k[i, j, 0]
                    phase = term if phase is None else phase + term
            cols.append(jnp.zeros(g_ext.shape[:1] + (mh, mw) + g.shape[3:], g.dtype) if phase is None else phase)
        rows.append(jnp.stack(cols, axis=3))
    full = jnp.stack(rows, axis=2).reshape(g.shape[0], mh * sh, mw * sw, g.shape[3])
    return full[:, top:top + x_hw[0], left:left + x_hw[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def shifted_depthwise_conv2d(x, kernel, stride, padding, dilation):
    return _forward(x, kernel, stride, padding, dilation)


def _fwd(x, kernel, stride, padding, dilation):
    return _forward(x, kernel, stride, padding, dilation), (x, kernel)


def _bwd(stride, padding, dilation, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    ho, wo = g.shape[1:3]
    k = kernel.astype(g.dtype)
    # dx[a] = sum_i g_dilated[a + lo - i*d] k[i]: a stride-1 conv of the stride-dilated cotangent, kernel flipped,
    # padded so that exactly H x W outputs come out (negative pads crop).
    if dilation == (1, 1) and stride != (1, 1):
        dx = _strided_input_grad(g, k, stride, padding, x.shape[1:3])
    else:
        dilated = ((ho - 1) * stride[0] + 1, (wo - 1) * stride[1] + 1)
        pads = []
        for size, kdim, d, (lo, _), dil_size in zip(x.shape[1:3], (kh, kw), dilation, padding, dilated):
            left = (kdim - 1) * d - lo
            pads.append((left, size + (kdim - 1) * d - dil_size - left))
        g_padded = _pad(g, pads, interior=(stride[0] - 1, stride[1] - 1))
        dx = _taps_sum(g_padded, k[::-1, ::-1], (1, 1), dilation, x.shape[1:3])
    # dk[i, j] = sum_{b, y, x} xp[b, i*dh + s*y, j*dw + s*x] * g[b, y, x]
    xp = _pad(x, padding)
    dk = []
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i * dilation[0], j * dilation[1], 0),
                                (xp.shape[0], i * dilation[0] + (ho - 1) * stride[0] + 1,
                                 j * dilation[1] + (wo - 1) * stride[1] + 1, xp.shape[3]), (1, stride[0], stride[1], 1))
            dk.append(jnp.sum((tap * g).astype(jnp.float32), axis=(0, 1, 2)))
    dk = jnp.stack(dk).reshape(kh, kw, 1, -1).astype(kernel.dtype)
    return dx.astype(x.dtype), dk


shifted_depthwise_conv2d.defvjp(_fwd, _bwd)


dispatch.register(OP, dispatch.Backend("shifted", lambda: shifted_depthwise_conv2d, platforms=("cpu",), priority=1))
dispatch.register(OP, dispatch.Backend("lax", lambda: depthwise_conv2d_lax, platforms=None, priority=0))


class DepthwiseConv2dVJP(DepthwiseConv2d):
    """`DepthwiseConv2d` whose shifted (CPU) path differentiates with `shifted_depthwise_conv2d`'s VJP.

    `names`: optional logical names of the kernel's 4 dims (`[kh, kw, 1, C]`); the bias takes the last one.
    `param_dtype`: the parameters' storage dtype (the convolution computes in the input's dtype).
    """

    def __init__(self, channels: int, kernel_size=3, *, names=None, param_dtype=jnp.float32, **kwargs):
        super().__init__(channels, kernel_size, **kwargs)
        if names is not None and len(tuple(names)) != 4:
            raise ValueError(f"`names` must name the kernel's 4 dims [kh, kw, 1, C], got {names!r}")
        meta = {} if names is None else axes.param_metadata(tuple(names))
        self.kernel = nnx.Param(self.kernel.get_value().astype(param_dtype), **meta)
        if self.bias is not None:
            bias_meta = {} if names is None else axes.param_metadata(tuple(names)[-1:])
            self.bias = nnx.Param(self.bias.get_value().astype(param_dtype), **bias_meta)

    def __call__(self, x):
        stride, pads, dilation = conv_geometry(x, self.kernel.shape, self.stride, self.padding, self.dilation)
        y = dispatch.call(OP, self.implementation, lambda impl, x, kernel: impl(x, kernel, stride, pads, dilation),
                          x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)
