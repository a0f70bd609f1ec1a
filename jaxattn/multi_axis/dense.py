"""MaxViT block/grid attention for small tiles: dense fp32 softmax per tile with a hand-written backward.

Autodiff of `softmax(q k^T + bias) v` contracts the two weight gradients `dk = ds^T q` and `dv = p^T do` over the
query axis, which is the major dim of both operands ("TN" dots). XLA:CPU's fast GEMM path (YNNPACK) does not take
that form and falls back to Eigen, and XLA folds a plain `swapaxes` back into the dot's dimension numbers. The
backward here transposes the `[T, T]` tile matrices explicitly (kept by an optimisation barrier), so every dot of
the forward and the backward has its contracting dim minor on the lhs. Same values as the 'reference' path
(identical forward, gradients equal up to fp32 rounding); tiles are cut as the 'xla' path cuts them (`TILINGS`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.multi_axis.xla import TILINGS

def _materialized_transpose(x):
    # The barrier stops XLA from folding the transpose into the consuming dot (which would make it TN again).
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tile_attention(q, k, v, bias, scale: float):
    """`softmax(scale * q k^T + bias) v` per tile: q/k `[G, N, T, D]`, v `[G, N, T, Dv]`, bias `[N, T, T]`
    (all one float dtype, fp32 in the model) -> `[G, N, T, Dv]`."""
    return _forward(q, k, v, bias, scale)[0]


def _forward(q, k, v, bias, scale):
    logits = jnp.einsum("gntd,gnsd->gnts", q * scale, k) + bias
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("gnts,gnsd->gntd", probs, v), (q, k, v, probs)


def _backward(scale, residuals, g):
    q, k, v, probs = residuals
    dprobs = jnp.einsum("gntd,gnsd->gnts", g, v)
    dv = jnp.einsum("gnst,gntd->gnsd", _materialized_transpose(probs), g)
    dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
    dq = jnp.einsum("gnts,gnsd->gntd", dlogits, k) * scale
    dk = jnp.einsum("gnst,gntd->gnsd", _materialized_transpose(dlogits), q) * scale
    return dq, dk, dv, jnp.sum(dlogits, axis=0)


tile_attention.defvjp(_forward, _backward)


def partition_attention_dense(query, key, value, bias, *, partition, size, scale):
    """`[B, H, W, N, D]` q/k/v -> `[B, H, W, N, Dv]` in the query dtype; `bias` broadcastable to `[N, T, T]`.

    Computes in fp32 like the reference (for the small tiles it is meant for, `T <= 64` or so: it holds the
    `[tiles, N, T, T]` probabilities for the backward).
    """
    split, merge = TILINGS[partition]
    b, h, w, n = query.shape[:4]
    tokens = size[0] * size[1]

    def tiles(x):  # [B, H, W, N, D] -> [B * tiles, N, T, D]
        t = split(x.astype(jnp.float32), size)
        return t.reshape(-1, *t.shape[2:]).transpose(0, 2, 1, 3)

    bias = (jnp.zeros((n, tokens, tokens), jnp.float32) if bias is None
            else jnp.broadcast_to(bias.astype(jnp.float32), (n, tokens, tokens)))
    out = tile_attention(tiles(query), tiles(key), tiles(value), bias, scale).transpose(0, 2, 1, 3)
    return merge(out.reshape(b, -1, *out.shape[1:]), size, (h, w)).astype(query.dtype)
