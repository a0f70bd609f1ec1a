"""A Linear layer over the last axis of `[..., in]` inputs that trains faster on XLA:CPU.

`nnx.Linear` contracts `[B, H, W, in]` with `[in, out]` directly; its weight gradient is then a dot that contracts
three axes of the inputs and of the cotangent, which XLA:CPU lowers by writing the large `[tokens, out]` cotangent
transposed -- with its producers (BatchNorm/LayerNorm/GELU backward) fused into that transposing loop and
recomputed in a cache-hostile order. Flattening to `[tokens, in] @ [in, out]` first makes both gradients plain 2-D
matmuls. Measured on a MaxViT MBConv train step (stride 2, 112 px, 256 channels, batch 8): -35%. Same parameters,
initialisation, dtype promotion and loaders as `nnx.Linear`; identical values.

`dense_general` is the same for kernels whose input and output are groups of dims (`[C, 3, heads, head_dim]`
qkv kernels, `[heads, head_dim, C]` output projections), so that heads stay a dim of their own that the `tensor`
mesh axis can split.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes


def dense(x, kernel, bias=None, *, preferred_element_type=None):
    """`x [..., in] @ kernel [in, out] (+ bias [out])` as one 2-D matmul over the flattened leading axes."""
    return dense_general(x, kernel, bias, n_in=1, preferred_element_type=preferred_element_type)


def dense_general(x, kernel, bias=None, *, n_in: int, preferred_element_type=None):
    """`x [..., *in] . kernel [*in, *out] (+ bias [*out])`, contracting the `n_in` trailing dims of `x` with the
    first `n_in` of `kernel`; the leading dims of `x` are flattened first (one matmul-shaped dot)."""
    lead, inner = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    if tuple(inner) != tuple(kernel.shape[:n_in]):
        raise ValueError(f"`x` {tuple(x.shape)} must end in the kernel's input dims {tuple(kernel.shape[:n_in])}")
    flat = x.reshape((-1,) + tuple(inner))
    contract = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
    y = jax.lax.dot_general(flat, kernel, (contract, ((), ())), preferred_element_type=preferred_element_type)
    y = y.reshape(tuple(lead) + tuple(kernel.shape[n_in:]))
    return y if bias is None else y + bias.astype(y.dtype)


class Dense(nnx.Linear):
    """`nnx.Linear` computed with `dense`.

    `names`: optional logical axis names of the kernel `(in_name, out_name)` (`models/layers/axes.py`); the bias
    is named `(out_name,)`. Without it the parameters carry no names (the FSDP fallback shards them).
    """

    def __init__(self, in_features: int, out_features: int, *, names: Sequence | None = None, **kwargs):
        if names is not None:
            names = tuple(names)
            if len(names) != 2:
                raise ValueError(f"`names` must name the kernel's 2 dims (in, out), got {names!r}")
            kwargs.update(kernel_metadata=axes.param_metadata(names), bias_metadata=axes.param_metadata(names[1:]))
        super().__init__(in_features, out_features, **kwargs)

    def __call__(self, inputs):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype or jnp.result_type(inputs, kernel)
        inputs, kernel = inputs.astype(dtype), kernel.astype(dtype)
        return dense(inputs, kernel, None if bias is None else bias.astype(dtype),
                     preferred_element_type=self.preferred_element_type)


class DenseGeneral(nnx.Module):
    """A linear map between groups of trailing dims, `[..., *in_shape] -> [..., *out_shape]`, computed with
    `dense_general`: kernel `[*in_shape, *out_shape]` (Glorot-uniform over the flattened fan-in and fan-out, as a
    `Dense` of the same total sizes), optional bias `[*out_shape]` (zeros), both stored in `param_dtype` and named
    `names` (the kernel's dims; the bias takes the output ones). Inputs and parameters are cast to `dtype`
    (None: their promoted dtype)."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence, *, use_bias: bool = True,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        names = tuple(names)
        n_in, ndim = len(self.in_shape), len(self.in_shape) + len(self.out_shape)
        if len(names) != ndim:
            raise ValueError(f"`names` must name the kernel's {ndim} dims {self.in_shape + self.out_shape}, "
                             f"got {names!r}")
        init = nnx.initializers.xavier_uniform(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, ndim)))
        self.kernel = nnx.Param(init(rngs.params(), self.in_shape + self.out_shape, param_dtype),
                                **axes.param_metadata(names))
        self.bias = (nnx.Param(jnp.zeros(self.out_shape, param_dtype), **axes.param_metadata(names[n_in:]))
                     if use_bias else nnx.data(None))
        self.dtype = dtype

    def __call__(self, x):
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        bias = None if self.bias is None else self.bias[...].astype(dtype)
        return dense_general(x.astype(dtype), kernel.astype(dtype), bias, n_in=len(self.in_shape))
