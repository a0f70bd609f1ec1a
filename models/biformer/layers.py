"""BiFormer's parameterised layers, each naming its parameters' dims with the logical axes of
`models/layers/axes.py`, storing them in `param_dtype` and computing in `dtype` (norm statistics in fp32).

Attention projections keep heads as a separate dim (`Projection`), so `tensor` splits heads (Megatron: qkv
column-parallel, the output projection row-parallel). The reference's fused qkv Linear of BRA (`[q | k | v]`,
`2 * qk_dim + dim` outputs) is stored per head, `[C, heads, 2 * dq + dv]` (`fused_qkv_per_head`), so a split over
heads hands each device its heads' q, k and v.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models.layers import DepthwiseConv2d, axes

LN_EPS = 1e-6  # the reference's LayerNorm ("important to avoid attention collapsing")
BN_EPS, BN_MOMENTUM = 1e-5, 0.9  # torch BatchNorm2d defaults (torch momentum 0.1 == flax 0.9)
_trunc02 = nnx.initializers.truncated_normal(0.02)
_NORM_INITS = dict(scale_init=axes.annotate(nnx.initializers.ones, (axes.NORM,)),
                   bias_init=axes.annotate(nnx.initializers.zeros, (axes.NORM,)))
CONV_NAMES = (axes.CONV_KERNEL, axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)
DEPTHWISE_NAMES = (axes.CONV_KERNEL, axes.CONV_KERNEL, None, axes.EMBED)


class Projection(nnx.Module):
    """A linear map between groups of trailing dims, `[..., *in_shape] -> [..., *out_shape]`, with an optional bias
    `[*out_shape]`: the kernel `[*in_shape, *out_shape]` (truncated N(0, 0.02)) names its dims `names`, the bias
    the output's. Computed as one 2-D matmul over the flattened tokens and groups (the fast form on XLA:CPU, see
    `models/layers/dense.py`); `dtype` None computes in the promoted dtype of input and kernel, which is also the
    result's, unless `out_dtype` (e.g. fp32 for logits) is given. Products accumulate, and the bias is added, in
    at least fp32."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence, *, use_bias=True,
                 dtype=None, param_dtype=jnp.float32, out_dtype=None, rngs: nnx.Rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype, self.out_dtype = dtype, out_dtype
        shape = self.in_shape + self.out_shape
        if len(names) != len(shape):
            raise ValueError(f"`names` {tuple(names)} must name every dim of the kernel {shape}")
        self.kernel = nnx.Param(_trunc02(rngs.params(), shape, param_dtype), **axes.param_metadata(names))
        out_names = tuple(names)[len(self.in_shape):]
        self.bias = (nnx.Param(jnp.zeros(self.out_shape, param_dtype), **axes.param_metadata(out_names))
                     if use_bias else nnx.data(None))

    def __call__(self, x):
        n_in = len(self.in_shape)
        if tuple(x.shape[x.ndim - n_in:]) != self.in_shape:
            raise ValueError(f"`x` must end in {self.in_shape}, got shape {tuple(x.shape)}")
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        lead = x.shape[:x.ndim - n_in]
        accumulate = self.out_dtype or jnp.promote_types(dtype, jnp.float32)
        y = jnp.dot(x.astype(dtype).reshape(-1, math.prod(self.in_shape)),
                    kernel.astype(dtype).reshape(math.prod(self.in_shape), -1), preferred_element_type=accumulate)
        y = y.reshape(*lead, *self.out_shape)
        if self.bias is not None:  # added before rounding: its gradient (a sum over tokens) then sums in fp32
            y = y + self.bias[...].astype(accumulate)
        return y.astype(self.out_dtype or dtype)


def linear(d_in: int, d_out: int, names: Sequence, **kw) -> Projection:
    return Projection((d_in,), (d_out,), names, **kw)


def layer_norm(dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm (eps 1e-6); flax computes its statistics in fp32 whatever `dtype` is."""
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **_NORM_INITS)


def batch_norm(dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(dim, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs, **_NORM_INITS)


def conv3x3_s2(d_in: int, d_out: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """3x3 stride-2 conv; its result (and the bias sum) in at least fp32, for the BatchNorm after it."""
    return nnx.Conv(d_in, d_out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype,
                    param_dtype=param_dtype, preferred_element_type=jnp.promote_types(dtype or jnp.float32,
                                                                                      jnp.float32), kernel_init=axes.annotate(nnx.initializers.lecun_normal(), CONV_NAMES),
                    bias_init=axes.annotate(nnx.initializers.zeros, CONV_NAMES[-1:]), rngs=rngs)


def depthwise(dim: int, kernel: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs) -> DepthwiseConv2d:
    """A `kernel x kernel` depthwise conv ('same' padding) over `dim` channels of the model width."""
    return DepthwiseConv2d(dim, kernel, padding=kernel // 2, names=DEPTHWISE_NAMES, param_dtype=param_dtype,
                           rngs=rngs)


def gelu(x):
    """torch nn.GELU (exact, erf), computed in fp32 (its derivative has an exp) and returned in `x.dtype`."""
    return jax.nn.gelu(x.astype(jnp.promote_types(x.dtype, jnp.float32)), approximate=False).astype(x.dtype)


def fused_qkv_per_head(w, qk_dim: int, num_heads: int):
    """The reference's fused qkv outputs `[..., q (qk_dim) | k (qk_dim) | v (dim)]` regrouped per head:
    `[..., num_heads, q_h | k_h | v_h]` (numpy; for kernels `[C, 2 * qk_dim + dim]` and biases alike)."""
    w = np.asarray(w)
    parts = np.split(w, [qk_dim, 2 * qk_dim], axis=-1)
    return np.concatenate([p.reshape(*w.shape[:-1], num_heads, -1) for p in parts], axis=-1)


def per_head_qkv_fused(w, qk_dim: int):
    """The inverse of `fused_qkv_per_head`: `[..., heads, 2 * dq + dv]` -> `[..., 2 * qk_dim + dim]`."""
    w = np.asarray(w)
    dq = qk_dim // w.shape[-2]
    parts = np.split(w, [dq, 2 * dq], axis=-1)
    return np.concatenate([p.reshape(*w.shape[:-2], -1) for p in parts], axis=-1)
