"""Chunked lightning attention in plain XLA: quadratic inside a block, a running fp32 state between blocks.

For a block of `L` rows entering with state `KV` (the decayed sum of `k_s^T v_s` over all earlier tokens, up to
the token just before the block):
  out_r = sum_{c<=r} lambda^(r-c) (q_r . k_c) v_c  +  lambda^(r+1) q_r KV
  KV   <- lambda^L KV + sum_c lambda^(L-1-c) k_c^T v_c
A `lax.scan` runs over the blocks; a partial block is zero-padded at the front, which is exact (zero keys and
values keep the zero starting state at zero). The initial state enters in closed form outside the scan.

The gradient is a `custom_vjp` built from the same recurrence (memory O(T * block), nothing `T x T` stored):
  dq     = chunked(dO, V, K)                                  (forward in time, state V^T K)
  dk, dv = one reverse-time scan with the shared state Q^T dO (dv is chunked(K, Q, dO) in reversed time,
           dk is chunked(V, dO, Q), whose state is the transpose)
plus the terms of the final-state cotangent, `lambda^(T-1-s)` times `dS v_s` and `dS^T k_s`. The backward is
plain differentiable JAX, so higher-order derivatives work as well.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.lightning.reference import decay_weights

DEFAULT_BLOCK = 64
F32 = jnp.float32


class _Decays(NamedTuple):
    """Decay factors of one block of `L` rows (None where there is no decay)."""
    intra: jax.Array         # [N or 1, L, L]: lambda^(r-c) for r >= c, else 0
    rows: jax.Array | None   # [L, N]: lambda^(r+1), applied to the incoming state's contribution
    cols: jax.Array | None   # [L, N]: lambda^(L-1-c), weight of key c in the outgoing state
    whole: jax.Array | None  # [N]: lambda^L, decay of the state across the block


def _decays(slopes, length: int) -> _Decays:
    r = jnp.arange(length, dtype=F32)
    dist = r[:, None] - r[None, :]
    intra = jnp.where(dist >= 0, decay_weights(slopes, jnp.maximum(dist, 0.0)), 0.0)
    if slopes is None:
        return _Decays(intra, None, None, None)
    return _Decays(intra, decay_weights(slopes, r + 1).T, decay_weights(slopes, length - 1 - r).T,
                   decay_weights(slopes, jnp.asarray(float(length))))


def _block_out(state, q, k, v, dec: _Decays):
    """Output of one block: `q, k [B, L, N, H]`, `v [B, L, N, Hv]`, incoming `state [B, N, H, Hv]` -> fp32."""
    scores = jnp.einsum("brnh,bcnh->bnrc", q, k, preferred_element_type=F32) * dec.intra
    out = jnp.einsum("bnrc,bcne->brne", scores.astype(v.dtype), v, preferred_element_type=F32)
    inter = jnp.einsum("brnh,bnhe->brne", q.astype(F32), state)
    if dec.rows is not None:
        inter = inter * dec.rows[None, :, :, None]
    return out + inter


def _block_update(state, k, v, dec: _Decays):
    """The state leaving a block: `lambda^L state + sum_c lambda^(L-1-c) k_c^T v_c` in fp32."""
    kf = k.astype(F32)
    if dec.rows is not None:
        kf = kf * dec.cols[None, :, :, None]
        state = state * dec.whole[None, :, None, None]
    return state + jnp.einsum("bcnh,bcne->bnhe", kf, v.astype(F32))


def _scan_blocks(body, arrays, state, block):
    """Runs `body(state, blocks) -> (state, outs)` over `[B, T, ...]` arrays cut into blocks along T.

    A partial block is zero-padded at the front, where it is exact: zero keys and values leave a zero state at
    zero, and the padded rows' outputs are dropped.
    """
    t = arrays[0].shape[1]
    pad = -t % block
    num = (t + pad) // block

    def to_blocks(x):
        x = jnp.pad(x, [(0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((x.shape[0], num, block) + x.shape[2:]), 1, 0)

    def from_blocks(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((y.shape[0], num * block) + y.shape[3:])[:, pad:]

    state, outs = jax.lax.scan(body, state, tuple(to_blocks(x) for x in arrays))
    return state, jax.tree.map(from_blocks, outs)


def _chunked_forward(q, k, v, slopes, block):
    dec = _decays(slopes, block)

    def body(state, x):
        q, k, v = x
        return _block_update(state, k, v, dec), _block_out(state, q, k, v, dec)

    state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), F32)
    state, out = _scan_blocks(body, (q, k, v), state, block)
    return out, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked(q, k, v, slopes, block):
    """Causal lightning attention from a zero state: `(out [B, T, N, Hv] fp32, final_state [B, N, H, Hv] fp32)`.

    `slopes` `[N]` fp32 or None; it gets a zero cotangent (the public API stops its gradient).
    """
    return _chunked_forward(q, k, v, slopes, block)


def _chunked_fwd(q, k, v, slopes, block):
    return _chunked_forward(q, k, v, slopes, block), (q, k, v, slopes)


def _flip(x):
    return jnp.flip(x, axis=1)


def _key_value_grads(q, k, v, d_out, slopes, block):
    """dK, dV (fp32) of the outputs, in one reverse-time scan sharing the state `sum lambda^. q^T dO`.

    In reversed time dV is lightning attention of (K, Q, dO) and dK that of (V, dO, Q), whose state is the
    transpose of the first one's.
    """
    dec = _decays(slopes, block)

    def body(state, x):
        q, k, v, do = x
        dv = _block_out(state, k, q, do, dec)
        dk = _block_out(jnp.swapaxes(state, -1, -2), v, do, q, dec)
        return _block_update(state, q, do, dec), (dk, dv)

    state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], d_out.shape[3]), F32)
    _, (dk, dv) = _scan_blocks(body, tuple(map(_flip, (q, k, v, d_out))), state, block)
    return _flip(dk), _flip(dv)


def _chunked_bwd(block, residuals, cotangents):
    q, k, v, slopes = residuals
    d_out, d_state = cotangents
    dq, _ = chunked(d_out, v, k, slopes, block)  # forward in time, state V^T K
    dk, dv = _key_value_grads(q, k, v, d_out, slopes, block)
    # The final state holds lambda^(T-1-s) k_s^T v_s.
    t = q.shape[1]
    to_end = decay_weights(slopes, t - 1 - jnp.arange(t, dtype=F32)).T[None, :, :, None]  # [1, T, N, 1]
    dk = dk + jnp.einsum("bsne,bnhe->bsnh", v.astype(F32), d_state) * to_end
    dv = dv + jnp.einsum("bsnh,bnhe->bsne", k.astype(F32), d_state) * to_end
    d_slopes = None if slopes is None else jnp.zeros_like(slopes)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_slopes


chunked.defvjp(_chunked_fwd, _chunked_bwd)


def lightning_chunked(query, key, value, slopes, initial_state, *, is_causal, block_size=DEFAULT_BLOCK):
    """Returns `(out [B, T, N, Hv] in query dtype, final_state [B, N, H, Hv] fp32 or None when non-causal)`.

    Same semantics as `reference.lightning_reference`; memory O(T * block) forward and backward.
    """
    t = query.shape[1]
    block = max(1, min(int(block_size), t))
    if not is_causal:
        return _bidirectional(query, key, value, slopes, block).astype(query.dtype), None
    out, state = chunked(query, key, value, slopes, block)
    if initial_state is not None:
        # The initial state sits just before token 0: token t sees it decayed by lambda^(t+1).
        s0 = initial_state.astype(F32)
        pos = jnp.arange(t, dtype=F32)
        from_start = decay_weights(slopes, pos + 1).T[None, :, :, None]
        out = out + jnp.einsum("btnh,bnhe->btne", query.astype(F32), s0) * from_start
        state = state + s0 * decay_weights(slopes, jnp.asarray(float(t)))[None, :, None, None]
    return out.astype(query.dtype), state


def _bidirectional(query, key, value, slopes, block):
    """`o_t = sum_s lambda^|t-s| (q_t . k_s) v_s` in fp32."""
    if slopes is None:  # no decay: q (K^T V), linear in T without any blocking
        kv = jnp.einsum("bsnh,bsne->bnhe", key, value, preferred_element_type=F32)
        return jnp.einsum("btnh,bnhe->btne", query.astype(F32), kv)

    # Causal pass + anti-causal pass (causal in reversed time) count the diagonal s == t twice.
    forward, _ = chunked(query, key, value, slopes, block)
    backward, _ = chunked(_flip(query), _flip(key), _flip(value), slopes, block)
    diag = jnp.einsum("btnh,btnh->btn", query, key, preferred_element_type=F32)[..., None] * value.astype(F32)
    return forward + _flip(backward) - diag
