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


# --- Softmax extensions (issue 16): attention sinks and logit soft-capping, shared by the op, kernels and CP. ---


def soft_cap(logits, cap):
    """Gemma-2 soft-capping `cap * tanh(logits / cap)` of the scaled logits (before bias and masks); `cap=None`
    returns `logits` unchanged."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)


def soft_cap_derivative(capped, cap):
    """`d soft_cap / d logits = 1 - tanh(logits / cap)^2`, from the capped values `cap * tanh(logits / cap)`
    (what a backward recomputes anyway); `cap=None` gives 1."""
    if cap is None:
        return jnp.ones_like(capped)
    t = capped / cap
    return 1.0 - t * t


def merge_sink(out, lse, sink):
    """Adds a sink logit (a key with no value) to the denominator of a finished softmax.

    out: fp32 `[..., rows, dim]` normalised over the keys; lse: fp32 `[..., rows]` of the keys alone; sink: fp32
    broadcastable to `lse` (one logit per query head). Returns `(out * exp(lse - lse'), lse')` with
    `lse' = logaddexp(lse, sink)`. Merge the sink exactly once, after all key blocks (ring attention merges the
    blocks' partials first). A row that saw no key keeps output 0 and gets `lse' = sink`.
    """
    sink = jnp.broadcast_to(jnp.asarray(sink, jnp.float32), lse.shape)
    lse_total = jnp.logaddexp(lse, sink)
    weight = jnp.exp(lse - lse_total)  # exp(-inf) = 0 for empty rows; lse_total is finite
    return out * weight[..., None], lse_total


def backward_delta(out, d_out, d_lse=None, *, keepdims=False):
    """`delta = rowsum(d_out * out) - d_lse` in fp32: the per-row term of every attention backward's
    `ds = p * (d_out v^T - delta)` (and of `sink_gradient`), computed once per backward from the finished output.

    out, d_out: `[..., rows, dim]` (any float dtypes; fp32 keeps it exact); d_lse: the lse cotangent shaped like
    the result (`[..., rows]`, or `[..., rows, 1]` with `keepdims`) or None. Returns fp32 `[..., rows]`
    (`[..., rows, 1]` with `keepdims`).
    """
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=keepdims)
    return delta if d_lse is None else delta - d_lse.astype(jnp.float32)


def backward_delta_heads_last(out, d_out, d_lse=None):
    """`backward_delta` in the ops' layout: out, d_out `[B, T, N, Hv]`, d_lse `[B, N, T]` or None -> fp32
    `[B, N, T]` (the layout of `lse`)."""
    d_lse_rows = None if d_lse is None else jnp.swapaxes(d_lse, 1, 2)
    return jnp.swapaxes(backward_delta(out, d_out, d_lse_rows), 1, 2)


def sink_gradient(sink, lse, delta, reduce_axes):
    """Cotangent of the sink logits: `d sink = -sum p_sink * delta` over `reduce_axes`, with `p_sink =
    exp(sink - lse)` (lse including the sink) and `delta = backward_delta(...)` per row (the same
    `delta` as the keys' `ds = p * (dp - delta)`). sink broadcastable to `lse`, `delta` shaped like `lse`."""
    p_sink = jnp.exp(jnp.asarray(sink, jnp.float32) - lse)
    return -jnp.sum(p_sink * delta, axis=reduce_axes)
