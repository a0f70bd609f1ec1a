"""DiNAT's layers other than attention and blocks: the stem, the downsampler, the MLP, the head-shaped projection,
and their parameter names (`models/layers/axes.py`) and precision (`dtype` compute, `param_dtype` storage)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes

LN_EPS = 1e-5  # torch.nn.LayerNorm default; flax's default is 1e-6
trunc_normal_02 = nnx.initializers.truncated_normal(0.02)
IMAGE = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED)  # tokens at block boundaries
PER_HEAD = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.HEADS, axes.HEAD_DIM)
HIDDEN = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.MLP)


def add_fp32(y, param: nnx.Param):
    """`y + param` (a bias, broadcast over tokens) computed in float32 and returned in `y`'s dtype: the parameter's
    gradient then sums the tokens' cotangents in float32, not in a bf16 `dtype`. Same for `scale_fp32` (gains)."""
    return (y.astype(jnp.float32) + param[...].astype(jnp.float32)).astype(y.dtype)


def scale_fp32(y, param: nnx.Param):
    return (y.astype(jnp.float32) * param[...].astype(jnp.float32)).astype(y.dtype)


class Linear(nnx.Linear):
    """`nnx.Linear` whose bias is added by `add_fp32`."""

    def __call__(self, x):
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=self.preferred_element_type)
        return y if self.bias is None else add_fp32(y, self.bias)


class Conv3x3s2(nnx.Conv):
    """torch `Conv2d(kernel 3, stride 2, padding 1)` on NHWC (output `ceil(H / 2)`), bias added by `add_fp32`."""

    def __init__(self, d_in, d_out, *, use_bias, dtype, param_dtype, rngs):
        kernel = (axes.CONV_KERNEL, axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)
        super().__init__(d_in, d_out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=use_bias,
                         dtype=dtype, param_dtype=param_dtype, kernel_metadata=axes.param_metadata(kernel),
                         bias_metadata=axes.param_metadata((axes.CONV_OUT,)), rngs=rngs)

    def __call__(self, x):
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (2, 2), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.bias is None else add_fp32(y, self.bias)


def linear(d_in, d_out, names, *, dtype, param_dtype, rngs, use_bias=True, **kwargs):
    """`Linear` with the reference's init; kernel dims named `names`, the bias named like the outputs."""
    return Linear(d_in, d_out, use_bias=use_bias, kernel_init=trunc_normal_02, dtype=dtype,
                      param_dtype=param_dtype, kernel_metadata=axes.param_metadata(names),
                      bias_metadata=axes.param_metadata(names[1:]), rngs=rngs, **kwargs)


def layer_norm(dim, *, dtype, param_dtype, rngs):
    names = axes.param_metadata((axes.NORM,))
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, scale_metadata=names,
                         bias_metadata=names, rngs=rngs)


def dropout(rate, rngs):
    # No rng stream when inactive: a model without dropout then holds parameters only (cheap to build abstractly).
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class Projection(nnx.Module):
    """A Linear layer between groups of trailing dims: `[..., *in_shape] -> [..., *out_shape]` (+ a bias of shape
    `out_shape`). The kernel `[*in_shape, *out_shape]` names its dims `names`, so attention's heads are a dim of
    their own (`[C, 3, heads, head_dim]`: `tensor` splits the heads of q, k and v alike, never across them)."""

    def __init__(self, in_shape, out_shape, names, *, use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.in_shape, self.out_shape, self.dtype = tuple(in_shape), tuple(out_shape), dtype
        self.kernel = nnx.Param(trunc_normal_02(rngs.params(), self.in_shape + self.out_shape, param_dtype),
                                **axes.param_metadata(names))
        self.bias = (nnx.Param(jnp.zeros(self.out_shape, param_dtype),
                               **axes.param_metadata(names[len(self.in_shape):])) if use_bias else nnx.data(None))

    def __call__(self, x):
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
        return y if self.bias is None else add_fp32(y, self.bias)


class ConvTokenizer(nnx.Module):
    """The stem: `[B, H, W, in_chans] -> [B, ceil(H/4), ceil(W/4), embed_dim]`."""

    def __init__(self, in_chans: int, embed_dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj0 = Conv3x3s2(in_chans, embed_dim // 2, use_bias=True, **kw)
        self.proj1 = Conv3x3s2(embed_dim // 2, embed_dim, use_bias=True, **kw)
        self.norm = layer_norm(embed_dim, **kw)

    def __call__(self, x):
        return axes.constrain(self.norm(self.proj1(self.proj0(x))), IMAGE)


class ConvDownsampler(nnx.Module):
    """`[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]`: 3x3 stride-2 conv without bias, then LayerNorm."""

    def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduction = Conv3x3s2(dim, 2 * dim, use_bias=False, **kw)
        self.norm = layer_norm(2 * dim, **kw)

    def __call__(self, x):
        return axes.constrain(self.norm(self.reduction(x)), IMAGE)


class Mlp(nnx.Module):
    """fc1 column-parallel, fc2 row-parallel: `tensor` splits the hidden units."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(dim, hidden, (axes.EMBED, axes.MLP), **kw)
        self.fc2 = linear(hidden, dim, (axes.MLP, axes.EMBED), **kw)
        self.drop = dropout(drop, rngs)

    def __call__(self, x):
        h = self.fc1(x)  # torch nn.GELU is the exact erf form; in float32 (its gradient takes an exp)
        x = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype)
        x = self.drop(axes.constrain(x, HIDDEN))
        return self.drop(self.fc2(x))
