"""Dense 2-D convolution and 3x3/2 max-pooling written for XLA:CPU's fast paths (NHWC).

XLA:CPU lowers a convolution's weight gradient to a slow transposed convolution: in a halonet26t train step the
1x1 convs' weight gradients alone took longer than the whole forward pass, and a 3-channel stem conv runs far below
matmul speed. A 1x1 conv is a matmul, and a conv with few input channels is a matmul over its `k*k*C` patches, so
both are written that way (gradients become matmuls too). Wider k x k convs use `layers.conv.conv_general_dilated`
(XLA's convolution; on CPU its kernel gradient as matmuls where that pays).

`max_pool_3x3_s2` is torch's `MaxPool2d(3, 2, 1)` as a max over nine strided slices, with a custom VJP that routes
each output's gradient to the first maximal tap in row-major window order (torch's and XLA's tie rule), instead of
XLA's `select_and_scatter` (argmax bookkeeping with index tensors, an order of magnitude slower on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes
from jaxattn.models.layers.conv import conv_general_dilated

PATCHES_MAX_IN_CHS = 4  # convs with at most this many input channels use the patches-matmul form
# The logical names of a kernel's `[k, k, in, out]` dims (`models/layers/axes.py`); `tensor` splits the output
# channels (column-parallel). Row-parallel convs (after a tensor-split width) and convs whose output must stay whole
# over `tensor` (the residual width, the input of a column-parallel conv) pass their own `names`.
KERNEL_NAMES = (axes.CONV_KERNEL, axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)


def _taps(xp, kernel: int, stride: int, out_hw: tuple[int, int]):
    """The `kernel**2` strided windows of padded `xp`, each `[B, Ho, Wo, C]`, in row-major tap order."""
    ho, wo = out_hw
    return [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            for i in range(kernel) for j in range(kernel)]


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def conv2d(x, kernel, *, stride: int = 1, padding: int = 0):
    """`x [B, H, W, Cin]` * `kernel [k, k, Cin, Cout]` with symmetric zero `padding` -> `[B, Ho, Wo, Cout]`."""
    k, _, cin, cout = kernel.shape
    if k == 1 and padding == 0:
        return jnp.einsum("bhwc,co->bhwo", x[:, ::stride, ::stride], kernel[0, 0])
    if cin <= PATCHES_MAX_IN_CHS:
        out_hw = (_out_size(x.shape[1], k, stride, padding), _out_size(x.shape[2], k, stride, padding))
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        patches = jnp.concatenate(_taps(xp, k, stride, out_hw), axis=-1)  # [B, Ho, Wo, k*k*Cin], (ky, kx, c)
        return jnp.einsum("bhwp,po->bhwo", patches, kernel.reshape(k * k * cin, cout))
    return conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2d(nnx.Module):
    """Square conv with `nnx.Conv`'s parameter layout (`kernel [k, k, in, out]`, optional `bias`), via `conv2d`.

    The kernel's dims are named `names` (default `KERNEL_NAMES`; the bias takes the output channels' name).
    Parameters are stored in `param_dtype`; the conv runs in `dtype` (None: the input's dtype).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0, *,
                 use_bias: bool = False, kernel_init=nnx.initializers.lecun_normal(), names=KERNEL_NAMES,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_chs, out_chs)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype), **axes.param_metadata(names))
        self.bias = (nnx.Param(jnp.zeros((out_chs,), param_dtype), **axes.param_metadata(names[-1:]))
                     if use_bias else None)
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        y = conv2d(x.astype(dtype), self.kernel[...].astype(dtype), stride=self.stride, padding=self.padding)
        return y if self.bias is None else y + self.bias[...].astype(dtype)


def _pool_taps(x):
    h, w = x.shape[1:3]
    out_hw = (_out_size(h, 3, 2, 1), _out_size(w, 3, 2, 1))
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return _taps(xp, 3, 2, out_hw), out_hw


@jax.custom_vjp
def max_pool_3x3_s2(x):
    """torch `MaxPool2d(3, 2, 1)` on NHWC: padding never wins; `ceil((H - 1) / 2) + ...` = `(H - 1) // 2 + 1`."""
    taps, _ = _pool_taps(x)
    return functools.reduce(jnp.maximum, taps)


def _pool_fwd(x):
    y = max_pool_3x3_s2(x)
    return y, (x, y)


def _pool_bwd(residuals, g):
    x, y = residuals
    taps, (ho, wo) = _pool_taps(x)
    hp, wp = x.shape[1] + 2, x.shape[2] + 2
    grad = jnp.zeros((x.shape[0], hp, wp, x.shape[3]), g.dtype)
    taken = jnp.zeros(y.shape, jnp.bool_)
    for t, tap in enumerate(taps):
        i, j = divmod(t, 3)
        first = (tap == y) & ~taken
        taken = taken | first
        # the transpose of a stride-2 slice: interior padding puts each value back at its tap position
        placed = jax.lax.pad(jnp.where(first, g, 0), jnp.zeros((), g.dtype),
                             ((0, 0, 0), (i, hp - i - 2 * (ho - 1) - 1, 1), (j, wp - j - 2 * (wo - 1) - 1, 1),
                              (0, 0, 0)))
        grad = grad + placed
    return (grad[:, 1:-1, 1:-1],)


max_pool_3x3_s2.defvjp(_pool_fwd, _pool_bwd)
