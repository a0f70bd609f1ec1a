"""Bi-level routing attention without k-fold copies of k/v: a scan over the routed slots with an online softmax.

The gather-based form materialises `[B, R, topk, T, C]` key and value copies (and autodiff keeps them, plus the
`[topk * T]`-wide probabilities, for the backward pass). Here the `topk` slots of every query region are visited
`chunk` at a time (`lax.scan`): each step gathers one `[B, R, chunk * T]` slab of k/v, folds its logits into the
running `(max, sum, acc)` of `jaxattn.core.softmax`, and drops it. The backward pass is a `custom_vjp` that
recomputes each step's probabilities from the saved log-sum-exp and scatter-adds the key/value gradients back to
their regions, so nothing `topk`-fold is stored either (FlashAttention-2 style, over routed regions).

`chunk` is the largest divisor of `topk` with `chunk * T <= max(block_keys, T)`: one region per step for the
large regions of early stages, a few at a time where regions hold only a handful of tokens (late stages), so
steps stay large enough to be efficient while the per-step copy stays bounded by `block_keys` keys per region.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.core import softmax
from jaxattn.routing import common

DEFAULT_BLOCK_KEYS = 64


def slots_per_step(topk: int, region_tokens: int, block_keys: int = DEFAULT_BLOCK_KEYS) -> int:
    limit = max(1, block_keys // region_tokens)
    return max(c for c in range(1, topk + 1) if topk % c == 0 and c <= limit)


def bilevel_routing_xla(query, key, value, *, num_regions, topk, scale, block_keys=DEFAULT_BLOCK_KEYS):
    """Returns `[B, H, W, N, Dv]` in the query dtype (see `jaxattn.bilevel_routing_attention`)."""
    indices = common.select_regions(query, key, num_regions, topk, scale)
    return routed_attention_xla(query, key, value, indices, num_regions=num_regions, scale=scale,
                                block_keys=block_keys)


def routed_attention_xla(query, key, value, indices, *, num_regions, scale, block_keys=DEFAULT_BLOCK_KEYS):
    """Attention of each query region to the key regions `indices [B, R, topk]` (int); `[B, H, W, N, Dv]` out."""
    q, k, v = (common.to_regions(x, num_regions) for x in (query, key, value))  # [B, R, T, N, D]
    chunk = slots_per_step(indices.shape[-1], q.shape[2], block_keys)
    out = _routed_attention(q, k, v, indices, float(scale), chunk)
    return common.from_regions(out, num_regions, query.shape[1:3])


def _steps(indices, chunk):
    """`[B, R, topk]` -> `[topk / chunk, B, R, chunk]` scan inputs."""
    b, r, topk = indices.shape
    return jnp.moveaxis(indices.reshape(b, r, topk // chunk, chunk), 2, 0)


def _gather(x, idx):
    """`x [B, R, T, N, D]`, `idx [B, R, c]` -> `[B, R, c*T, N, D]` (the routed regions of one step)."""
    g = x[jnp.arange(x.shape[0])[:, None, None], idx]  # [B, R, c, T, N, D]
    return g.reshape(*g.shape[:2], -1, *g.shape[4:])


def _scatter_add(acc, idx, update):
    """Adds `update [B, R, c*T, N, D]` into the regions `idx [B, R, c]` of `acc [B, R, T, N, D]`."""
    b, r, c = idx.shape
    update = update.reshape(b, r, c, *acc.shape[2:])
    return acc.at[jnp.arange(b)[:, None, None], idx].add(update)


def _logits(q, k_step, scale):
    return jnp.einsum("brtnd,brsnd->brnts", q, k_step, preferred_element_type=jnp.float32) * scale


def _prob_times_value(p, v_step):
    return jnp.einsum("brnts,brsnd->brntd", p.astype(v_step.dtype), v_step, preferred_element_type=jnp.float32)


def _forward(q, k, v, indices, scale, chunk):
    b, r, t, n, _ = q.shape

    def body(carry, idx):
        logits = _logits(q, _gather(k, idx), scale)
        return softmax.online_softmax_update(carry, logits, _gather(v, idx), _prob_times_value), None

    carry = softmax.online_softmax_init((b, r, n, t), v.shape[-1])
    carry, _ = jax.lax.scan(body, carry, _steps(indices, chunk))
    out, lse = softmax.online_softmax_finalize(carry)  # [B, R, N, T, Dv], [B, R, N, T]
    return jnp.moveaxis(out, 2, 3).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _routed_attention(q, k, v, indices, scale, chunk):
    return _forward(q, k, v, indices, scale, chunk)[0]


def _routed_attention_fwd(q, k, v, indices, scale, chunk):
    out, lse = _forward(q, k, v, indices, scale, chunk)
    return out, (q, k, v, indices, out, lse)


def _routed_attention_bwd(scale, chunk, residuals, d_out):
    q, k, v, indices, out, lse = residuals
    do = jnp.moveaxis(d_out, 2, 3)  # [B, R, N, T, Dv]
    delta = jnp.sum(do.astype(jnp.float32) * jnp.moveaxis(out, 2, 3).astype(jnp.float32), axis=-1)
    lse = softmax.finite_or_zero(lse)[..., None]
    q32 = q.astype(jnp.float32)

    def body(carry, idx):
        dq, dk, dv = carry
        k_step, v_step = _gather(k, idx), _gather(v, idx)
        p = jnp.exp(_logits(q, k_step, scale) - lse)  # [B, R, N, T, S]
        dv_step = jnp.einsum("brnts,brntd->brsnd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("brntd,brsnd->brnts", do, v_step, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("brnts,brsnd->brtnd", ds, k_step.astype(jnp.float32))
        dk = _scatter_add(dk, idx, jnp.einsum("brnts,brtnd->brsnd", ds, q32))
        dv = _scatter_add(dv, idx, dv_step)
        return (dq, dk, dv), None

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    (dq, dk, dv), _ = jax.lax.scan(body, zeros, _steps(indices, chunk))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_routed_attention.defvjp(_routed_attention_fwd, _routed_attention_bwd)
