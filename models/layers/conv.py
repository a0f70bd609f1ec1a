"""Dense 2-D convolution whose weight gradient is computed as matmuls on XLA:CPU.

XLA:CPU lowers a convolution's weight gradient as another convolution whose window is the whole image; YNNPACK
runs that at 64-85 GFLOP/s here (a 3x3 32->64 conv at 128 px, batch 8: ~90 ms against ~23 ms for its forward).
`conv_weight_grad` writes it as `kh` matmuls instead: the input is unfolded along the width only (`kw` strided
column windows side by side, `[B, rows, Wo, kw*C]`), flattened over pixels, and kernel row `i` is then the product
of the transposed cotangent `[O, pixels]` with that unfolding shifted by `i // stride` rows -- a contiguous slice
of the flat pixel axis, because the cotangent is padded with zero rows at the bottom of each image so the shift
never mixes images. A stride > 1 splits the rows by phase (`row % stride`) first. Measured on the shape above:
~88 -> ~62 ms CPU. The forward and the input gradient stay XLA's own convolutions (both fast).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` behind the dispatch op `conv2d_weight_grad`:
in programs lowered for CPU it takes this path ('matmul_grad') for NHWC/HWIO convolutions without groups,
dilation or `preferred_element_type` that are large enough for it to pay (`MIN_OUT_PIXELS`, `MIN_CHANNEL_PRODUCT`:
XLA's own gradient is faster on small images), and `lax.conv_general_dilated` ('lax') otherwise and on every other
platform (they keep XLA's gradients). HaloNet's wide k x k convs use it; an `nnx.Conv` can take it as its
`conv_general_dilated=` argument.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.core import dispatch

OP = "conv2d_weight_grad"
NHWC = ("NHWC", "HWIO", "NHWC")
# Where the matmul form pays (kernel gradient, batch 8, CPU ms, lax -> matmuls): 32->64 ch at 128 px 85 -> 70,
# 64->64 at 112 px 133 -> 91; but 64->64 at 64 px 24 -> 29, 128->128 at 32 px 24 -> 29, 24->32 at 128 px 26 -> 33.
MIN_OUT_PIXELS = 96 * 96  # per image
MIN_CHANNEL_PRODUCT = 32 * 64  # in * out channels


def conv_weight_grad(x, g, kernel_hw, stride, padding):
    """Weight gradient `[kh, kw, C, O]` (f32 accumulation, `x.dtype` out) of the NHWC/HWIO convolution of
    `x [B, H, W, C]` with output cotangent `g [B, Ho, Wo, O]`, strides `(sh, sw)` and zero padding
    `((top, bottom), (left, right))` (non-negative)."""
    b, h, w, c = x.shape
    _, ho, wo, o = g.shape
    (kh, kw), (sh, sw), ((top, _), (left, _)) = kernel_hw, stride, padding
    extra = (kh - 1) // sh  # rows a phase needs below the output grid
    rows, hg = sh * (ho + extra), ho + extra
    cols = sw * (wo - 1) + kw
    # rows/columns past the convolution's own padding only ever meet the cotangent's zero padding
    xp = jnp.pad(x, ((0, 0), (top, max(rows - top - h, 0)), (left, max(cols - left - w, 0)), (0, 0)))
    xp = xp[:, :rows, :cols]
    unfolded = jnp.concatenate([xp[:, :, j:j + sw * (wo - 1) + 1:sw] for j in range(kw)], axis=-1)
    n = b * hg * wo
    gt = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0))).reshape(n, o).T  # [O, pixels]
    rows_out = [None] * kh
    for r in range(min(sh, kh)):
        phase = unfolded[:, r::sh].reshape(n, kw * c)
        phase = jnp.pad(phase, ((0, extra * wo), (0, 0)))
        for i in range(r, kh, sh):
            shifted = jax.lax.slice_in_dim(phase, (i // sh) * wo, (i // sh) * wo + n, axis=0)
            rows_out[i] = jnp.dot(gt, shifted, preferred_element_type=jnp.float32)  # [O, kw*C]
    dw = jnp.stack(rows_out).reshape(kh, o, kw, c).transpose(0, 2, 3, 1)
    return dw.astype(x.dtype)


def _lax_conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_matmul_grad(x, kernel, stride, padding):
    """`lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=NHWC)` (explicit, non-negative
    padding pairs) whose kernel gradient is `conv_weight_grad`."""
    return _lax_conv(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding):
    return _lax_conv(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, residuals, g):
    x, kernel = residuals
    (dx,) = jax.linear_transpose(lambda t: _lax_conv(t, kernel, stride, padding),
                                 jax.ShapeDtypeStruct(x.shape, x.dtype))(g)
    dw = conv_weight_grad(x, g, kernel.shape[:2], stride, padding).astype(kernel.dtype)
    return dx, dw


conv2d_matmul_grad.defvjp(_fwd, _bwd)


def _fast_path_applies(*, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                       feature_group_count, batch_group_count, precision, extra) -> bool:
    """Needs a 2-D NHWC/HWIO conv without groups, dilation, `precision` or extra arguments, large enough to pay.

    Large enough: at least `MIN_CHANNEL_PRODUCT` in x out channels and `MIN_OUT_PIXELS` output pixels per image
    (below that XLA's own kernel gradient is the faster one); the padding must be non-negative."""
    if extra or precision is not None:
        return False
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype or feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(d not in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
        return False
    if len(tuple(window_strides)) != 2:
        return False
    try:
        wanted = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
        given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return False
    if wanted != given:
        return False
    if not isinstance(padding, str) and any(p < 0 for pair in padding for p in pair):
        return False
    if rhs.shape[2] * rhs.shape[3] < MIN_CHANNEL_PRODUCT:
        return False
    out_pixels = 1
    for size, k, s in zip(lhs.shape[1:3], rhs.shape[:2], window_strides):
        out_pixels *= -(-max(size - k + 1, 1) // int(s))  # lower bound: VALID output size
    return out_pixels >= MIN_OUT_PIXELS


def _matmul_grad_conv(lhs, rhs, window_strides, padding, *defaults, **no_kwargs):
    """`conv2d_matmul_grad` with `lax.conv_general_dilated`'s arguments; `_fast_path_applies` has checked that the
    ones after `padding` (`defaults`, `no_kwargs`) change nothing."""
    stride = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], stride, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv2d_matmul_grad(lhs, rhs, stride, padding)


dispatch.register(OP, dispatch.Backend("matmul_grad", lambda: _matmul_grad_conv, platforms=("cpu",), priority=1,
                                       supports=_fast_path_applies))
dispatch.register(OP, dispatch.Backend("lax", lambda: jax.lax.conv_general_dilated, platforms=None, priority=0))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         implementation=None, **kwargs):
    """`lax.conv_general_dilated` with the same arguments and values; in programs lowered for CPU, 2-D NHWC/HWIO
    convolutions without groups or dilation get `conv_weight_grad` as their kernel gradient (see the module
    docstring). `implementation`: 'matmul_grad', 'lax' or None (chosen per lowering platform)."""
    extra = {k: v for k, v in kwargs.items() if v is not None}

    def body(impl, lhs, rhs):
        return impl(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, batch_group_count, precision, **kwargs)

    return dispatch.call(OP, implementation, body, lhs, rhs, lhs=lhs, rhs=rhs, window_strides=window_strides,
                         padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                         dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                         batch_group_count=batch_group_count, precision=precision, extra=extra)
