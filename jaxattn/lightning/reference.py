"""Obviously-correct lightning attention: the naive `T x T` decayed formula in fp32. For tests."""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import segments


def decay_weights(slopes, distance):
    """`exp(-slope * distance)` per head for non-negative `distance` (any shape): `[N, *distance.shape]`, or 1
    without decay. Distances are never negative here, so nothing overflows and underflow to 0 is the right limit."""
    if slopes is None:
        return jnp.ones((1,) + distance.shape, jnp.float32)
    return jnp.exp(-slopes.astype(jnp.float32).reshape((-1,) + (1,) * distance.ndim) * distance)


def lightning_reference(query, key, value, slopes, initial_state, *, is_causal, block_size=None, segment_ids=None):
    """Returns `(out [B, T, N, Hv] in query dtype, final_state [B, N, H, Hv] fp32 or None when non-causal)`.

    Causal: `o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S0`, final state
    `sum_s lambda^(T-1-s) k_s^T v_s + lambda^T S0`. Non-causal: `o_t = sum_s lambda^|t-s| (q_t . k_s) v_s`.
    With `segment_ids` `[B, T]` every pair `(t, s)` of different documents (`segments.document_ids`) is dropped,
    the initial state reaches the first document only and the final state holds the last one.
    `block_size` is ignored (accepted so every implementation shares one signature).
    """
    del block_size
    q, k, v = (x.astype(jnp.float32) for x in (query, key, value))
    b, t = q.shape[:2]
    pos = jnp.arange(t, dtype=jnp.float32)
    dist = pos[:, None] - pos[None, :]  # t - s
    if is_causal:
        weights = jnp.where(dist >= 0, decay_weights(slopes, jnp.maximum(dist, 0.0)), 0.0)
    else:
        weights = decay_weights(slopes, jnp.abs(dist))
    docs = segments.document_ids(segment_ids)
    if docs is None:
        docs = jnp.zeros((b, t), jnp.int32)
    weights = weights[None] * (docs[:, :, None] == docs[:, None, :])[:, None]  # [B, N, T, S]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * weights
    out = jnp.einsum("bnts,bsne->btne", scores, v)
    if not is_causal:
        return out.astype(query.dtype), None
    in_last = (docs == docs[:, -1:]).astype(jnp.float32)[:, :, None, None]  # [B, T, 1, 1]
    to_end = jnp.moveaxis(decay_weights(slopes, t - 1 - pos), 0, -1)  # [T, N]: lambda^(T-1-s)
    state = jnp.einsum("bsnh,bsne->bnhe", k * to_end[None, :, :, None] * in_last, v)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        in_first = (docs == 0).astype(jnp.float32)[:, :, None, None]
        from_start = jnp.moveaxis(decay_weights(slopes, pos + 1), 0, -1)  # [T, N]: lambda^(t+1)
        out = out + jnp.einsum("btnh,bnhe->btne", q, s0) * from_start[None, :, :, None] * in_first
        one_document = (docs[:, -1] == 0).astype(jnp.float32)[:, None, None, None]
        state = state + s0 * decay_weights(slopes, jnp.asarray(float(t)))[None, :, None, None] * one_document
    return out.astype(query.dtype), state
