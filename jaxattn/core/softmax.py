"""Numerically safe softmax pieces shared by the blocked XLA paths, the kernels and context parallelism.

Convention: logits are fp32 with masked entries at `-inf`; a row with no visible key yields output 0 and
log-sum-exp `-inf` (never NaN). Functions take plain arrays, so they run inside Pallas kernel bodies too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def finite_or_zero(x):
    """Replaces `-inf` row maxima (fully masked rows) by 0 so `exp(logits - max)` stays 0 instead of NaN."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def masked_logits(logits, mask):
    """`logits` where `mask` is True, `-inf` elsewhere (mask may be None)."""
    if mask is None:
        return logits
    return jnp.where(mask, logits, NEG_INF)


def softmax_stats(logits):
    """Row max and row sum of `exp(logits - max)` over the last axis, safe for fully masked rows."""
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    p = jnp.exp(logits - finite_or_zero(m)[..., None])
    return m, p, jnp.sum(p, axis=-1)


def online_softmax_init(row_shape, value_dim):
    """Carry `(max, sum, acc)` of an online softmax before the first key block."""
    m = jnp.full(row_shape, NEG_INF, jnp.float32)
    l = jnp.zeros(row_shape, jnp.float32)
    acc = jnp.zeros((*row_shape, value_dim), jnp.float32)
    return m, l, acc


def online_softmax_update(carry, logits, values, pv_matmul):
    """Folds one key block into the running `(max, sum, acc)`.

    logits: fp32 `[..., rows, keys]` with masked entries `-inf`; `pv_matmul(p, values)` returns the fp32
    `[..., rows, value_dim]` product (each caller knows its layout, e.g. GQA grouping).
    """
    m_prev, l_prev, acc_prev = carry
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=-1))
    m_safe = finite_or_zero(m_new)
    correction = jnp.exp(m_prev - m_safe)  # exp(-inf) = 0 when the previous blocks saw nothing
    p = jnp.exp(logits - m_safe[..., None])
    l_new = l_prev * correction + jnp.sum(p, axis=-1)
    acc_new = acc_prev * correction[..., None] + pv_matmul(p, values)
    return m_new, l_new, acc_new


def online_softmax_finalize(carry):
    """Normalises the accumulator; returns fp32 `(out, lse)`, zeros and `-inf` for rows that saw no key."""
    m, l, acc = carry
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, finite_or_zero(m) + jnp.log(jnp.where(seen, l, 1.0)), NEG_INF)
    return out, lse


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exactly combines two attention results over disjoint key sets through their log-sum-exp.

    out: `[..., rows, dim]`, lse: `[..., rows]` (fp32). Rows empty on both sides stay 0 / `-inf`.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    lse_safe = finite_or_zero(lse)
    w_a = jnp.exp(lse_a - lse_safe)[..., None]
    w_b = jnp.exp(lse_b - lse_safe)[..., None]
    return w_a * out_a + w_b * out_b, lse
