"""Small building blocks of TransNormerLLM-style stacks (shared with the softmax baseline)."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes

INIT_STD = 0.02  # TransNormerLLM's init_std for every Linear and the embedding
_init = nnx.initializers.normal(INIT_STD)
# Logical names of per-head activations `[B, T, heads, head_dim]`: heads split over `tensor`, tokens over `context`.
HEADS_ACTIVATION = (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM)
KV_HEADS_ACTIVATION = (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM)


class Projection(nnx.Module):
    """A bias-free linear map between groups of trailing dims: `[..., *in_shape] -> [..., *out_shape]`.

    The kernel `[*in_shape, *out_shape]` (N(0, 0.02), stored in `param_dtype`) names its dims `names` (logical
    axes, `models/layers/axes.py`), so e.g. a query projection `[embed, heads, head_dim]` splits its heads over
    the `tensor` mesh axis. Inputs and kernel are cast to `dtype` (None: their promoted dtype); `out_dtype`
    (e.g. float32 for logits) is the matmul's accumulation and result dtype.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence, *, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32, out_dtype=None):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype, self.out_dtype = dtype, out_dtype
        shape = self.in_shape + self.out_shape
        self.kernel = nnx.Param(_init(rngs.params(), shape, param_dtype), **axes.param_metadata(names))

    def __call__(self, x):
        n_in = len(self.in_shape)
        if tuple(x.shape[x.ndim - n_in:]) != self.in_shape:
            raise ValueError(f"`x` must end in {self.in_shape}, got shape {tuple(x.shape)}")
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())),
                                   preferred_element_type=self.out_dtype)


class Embedding(nnx.Module):
    """Token ids `[B, T]` -> rows of a `[vocab_size, d_model]` table (N(0, 0.02), stored in `param_dtype`), in
    `dtype`. The table's vocabulary splits over `tensor` and its width over `fsdp` like any weight; the lookup
    first gathers the width (as FSDP gathers every weight before use), so that rows are looked up for the
    batch-sharded tokens without moving the table's width onto the batch's devices."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = nnx.Param(_init(rngs.params(), (vocab_size, d_model), param_dtype),
                                   **axes.param_metadata((axes.VOCAB, axes.EMBED)))

    def __call__(self, tokens):
        table = self.embedding[...]
        table = axes.constrain(table.astype(self.dtype or table.dtype), (axes.VOCAB, None))
        return jnp.take(table, tokens, axis=0)


def srms_norm(x: jax.Array, eps: float = 1e-6, axis=-1) -> jax.Array:
    """SimpleRMSNorm: `x * rsqrt(mean(x^2) + eps)` over `axis` (an int or a tuple), no weight; computed in fp32,
    returned in `x.dtype`."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)).astype(x.dtype)


class SGLU(nnx.Module):
    """Simple GLU channel mixer: `W3 (W1 x * W2 x)`, no activation, no biases. `[B, T, d] -> [B, T, d]`; the hidden
    units split over the `tensor` mesh axis (W1, W2 by columns, W3 by rows: one all-reduce after W3)."""

    def __init__(self, d_model: int, glu_dim: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.l1 = Projection((d_model,), (glu_dim,), (axes.EMBED, axes.MLP), **kw)
        self.l2 = Projection((d_model,), (glu_dim,), (axes.EMBED, axes.MLP), **kw)
        self.l3 = Projection((glu_dim,), (d_model,), (axes.MLP, axes.EMBED), **kw)

    def __call__(self, x):
        hidden = axes.constrain(self.l1(x) * self.l2(x), (axes.BATCH, axes.LENGTH, axes.MLP))
        return self.l3(hidden)
