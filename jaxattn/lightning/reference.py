"""Obviously-correct lightning attention: the naive `T x T` decayed formula in fp32. For tests."""
from __future__ import annotations

import jax.numpy as jnp


def decay_weights(slopes, distance):
    """`exp(-slope * distance)` per head for non-negative `distance` (any shape): `[N, *distance.shape]`, or 1
    without decay. Distances are never negative here, so nothing overflows and underflow to 0 is the right limit."""
    if slopes is None:
        return jnp.ones((1,) + distance.shape, jnp.float32)
    return jnp.exp(-slopes.astype(jnp.float32).reshape((-1,) + (1,) * distance.ndim) * distance)


def lightning_reference(query, key, value, slopes, initial_state, *, is_causal, block_size=None):
    """Returns `(out [B, T, N, Hv] in query dtype, final_state [B, N, H, Hv] fp32 or None when non-causal)`.

    Causal: `o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S0`, final state
    `sum_s lambda^(T-1-s) k_s^T v_s + lambda^T S0`. Non-causal: `o_t = sum_s lambda^|t-s| (q_t . k_s) v_s`.
    `block_size` is ignored (accepted so every implementation shares one signature).
    """
    del block_size
    q, k, v = (x.astype(jnp.float32) for x in (query, key, value))
    t = q.shape[1]
    pos = jnp.arange(t, dtype=jnp.float32)
    dist = pos[:, None] - pos[None, :]  # t - s
    if is_causal:
        weights = jnp.where(dist >= 0, decay_weights(slopes, jnp.maximum(dist, 0.0)), 0.0)
    else:
        weights = decay_weights(slopes, jnp.abs(dist))
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * weights[None]
    out = jnp.einsum("bnts,bsne->btne", scores, v)
    if not is_causal:
        return out.astype(query.dtype), None
    to_end = jnp.moveaxis(decay_weights(slopes, t - 1 - pos), 0, -1)  # [T, N]: lambda^(T-1-s)
    state = jnp.einsum("bsnh,bsne->bnhe", k * to_end[None, :, :, None], v)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        from_start = jnp.moveaxis(decay_weights(slopes, pos + 1), 0, -1)  # [T, N]: lambda^(t+1)
        out = out + jnp.einsum("btnh,bnhe->btne", q, s0) * from_start[None, :, :, None]
        state = state + s0 * decay_weights(slopes, jnp.asarray(float(t)))[None, :, None, None]
    return out.astype(query.dtype), state
