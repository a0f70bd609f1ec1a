"""Chunked lightning attention in plain XLA: quadratic inside a block, a running fp32 state between blocks.

For a block of `L` rows entering with state `KV` (the decayed sum of `k_s^T v_s` over all earlier tokens, up to
the token just before the block):
  out_r = sum_{c<=r} lambda^(r-c) (q_r . k_c) v_c  +  lambda^(r+1) q_r KV
  KV   <- lambda^L KV + sum_c lambda^(L-1-c) k_c^T v_c
Blocks are sliced from the `[B, T, ...]` inputs inside a loop and outputs written in place, so nothing but the
fp32 output is allocated at length T (plus zero-padded inputs when `block` does not divide T: one loop body to
compile, not two). Every sweep also runs backwards in time (`reverse=True`: the anti-causal sum over `s >= t`, state
carried from the end), with mirrored decay factors and no flipped copies of the inputs.

The gradient is a `custom_vjp` built from the same sweeps (memory O(T * block), nothing `T x T` stored):
  dq     = chunked(dO, V, K), same direction                      (state V^T K)
  dk, dv = one sweep in the opposite direction sharing the state Q^T dO: dv is chunked(K, Q, dO) and dk is
           chunked(V, dO, Q), whose state is the transpose
plus the terms of the final-state cotangent. The backward is plain differentiable JAX (grad-of-grad works).

Packed documents (`docs`, document ids `[B, T]`): each block also gets the masks of `jaxattn.core.segments`
(scores of other documents dropped, the incoming state seen only by rows of its document, the outgoing state
holding only the block's last document). The weights `lambda^(t-s) [d_t == d_s]` are symmetric in the document
mask, so every gradient sweep uses the same document ids.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.core import segments
from jaxattn.lightning.reference import decay_weights
from jaxattn.core import vma

DEFAULT_BLOCK = 64
F32 = jnp.float32


class _Decays(NamedTuple):
    """Decay factors of one block of `L` rows (None where there is no decay), for a forward sweep; a reverse
    sweep mirrors them (`r -> L-1-r`)."""
    intra: jax.Array         # [N or 1, L, L]: lambda^(r-c) for r >= c, else 0
    rows: jax.Array | None   # [L, N]: lambda^(r+1), applied to the incoming state's contribution
    cols: jax.Array | None   # [L, N]: lambda^(L-1-c), weight of key c in the outgoing state
    whole: jax.Array | None  # [N]: lambda^L, decay of the state across the block


def _decays(slopes, length: int, reverse: bool) -> _Decays:
    r = jnp.arange(length, dtype=F32)
    dist = (r[:, None] - r[None, :]) * (-1 if reverse else 1)
    intra = jnp.where(dist >= 0, decay_weights(slopes, jnp.maximum(dist, 0.0)), 0.0)
    if slopes is None:
        return _Decays(intra, None, None, None)
    rows, cols = decay_weights(slopes, r + 1).T, decay_weights(slopes, length - 1 - r).T
    if reverse:
        rows, cols = rows[::-1], cols[::-1]
    return _Decays(intra, rows, cols, decay_weights(slopes, jnp.asarray(float(length))))


def _block_out(state, q, k, v, dec: _Decays, masks: segments.BlockMasks | None):
    """Output of one block: `q, k [B, L, N, H]`, `v [B, L, N, Hv]`, incoming `state [B, N, H, Hv]` -> fp32.
    `masks`: this block's document masks (`ids`, `enter`, `leave` `[B, L]`, `keep` `[B]`) or None."""
    scores = jnp.einsum("brnh,bcnh->bnrc", q, k, preferred_element_type=F32) * dec.intra
    if masks is not None:
        scores = scores * (masks.ids[:, :, None] == masks.ids[:, None, :])[:, None]
    out = jnp.einsum("bnrc,bcne->brne", scores.astype(v.dtype), v, preferred_element_type=F32)
    inter = jnp.einsum("brnh,bnhe->brne", q.astype(F32), state)
    if dec.rows is not None:
        inter = inter * dec.rows[None, :, :, None]
    if masks is not None:
        inter = inter * masks.enter[:, :, None, None]
    return out + inter


def _block_update(state, k, v, dec: _Decays, masks: segments.BlockMasks | None):
    """The state leaving a block: `lambda^L state + sum_c lambda^(L-1-c) k_c^T v_c` in fp32 (with documents:
    `keep * lambda^L state + sum_c leave_c ...`)."""
    kf = k.astype(F32)
    if dec.rows is not None:
        kf = kf * dec.cols[None, :, :, None]
        state = state * dec.whole[None, :, None, None]
    if masks is not None:
        kf = kf * masks.leave[:, :, None, None]
        state = state * masks.keep[:, None, None, None]
    return state + jnp.einsum("bcnh,bcne->bnhe", kf, v.astype(F32))


def _sweep(step, arrays, state, out_dims, slopes, docs, block, reverse):
    """Runs `step(state, blocks, decays, masks) -> (state, outs)` over the blocks of the `[B, T, N, ...]` `arrays`
    in time order (from the end when `reverse`), writing each block's outputs in place into fp32 `[B, T, N, d]`.

    When `block` does not divide T the inputs are zero-padded where the sweep starts (the front, or the end when
    `reverse`): zero keys and values keep the zero starting state at zero, and the padded rows are dropped (their
    document ids repeat the edge's). `docs`: document ids `[B, T]` or None (then `masks` is None).
    Returns `(state, outs)`.
    """
    b, t, n = arrays[0].shape[:3]
    pad = -t % block
    if pad:
        where = (0, pad) if reverse else (pad, 0)
        arrays = tuple(jnp.pad(x, [(0, 0), where] + [(0, 0)] * (x.ndim - 2)) for x in arrays)
    num = (t + pad) // block
    dec = _decays(slopes, block, reverse)
    all_masks = None
    if docs is not None:
        all_masks = segments.block_masks(segments.pad_documents(docs, t + pad, front=not reverse), block,
                                         reverse=reverse)

    def block_masks(j, start):
        if all_masks is None:
            return None
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
        return segments.BlockMasks(rows(all_masks.ids), rows(all_masks.enter), rows(all_masks.leave),
                                   jax.lax.dynamic_index_in_dim(all_masks.keep, j, axis=1, keepdims=False))

    def body(j, carry):
        state, outs = carry
        index = num - 1 - j if reverse else j
        start = index * block
        blocks = tuple(jax.lax.dynamic_slice_in_dim(x, start, block, axis=1) for x in arrays)
        state, ys = step(state, blocks, dec, block_masks(index, start))
        return state, tuple(jax.lax.dynamic_update_slice_in_dim(o, y, start, axis=1) for o, y in zip(outs, ys))

    outs = tuple(jnp.zeros((b, t + pad, n, d), F32) for d in out_dims)
    carry = vma.varying_like((state, outs), arrays, slopes)  # inside a shard_map with check_vma
    state, outs = jax.lax.fori_loop(0, num, body, carry)
    if pad:
        outs = tuple(o[:, :t] if reverse else o[:, pad:] for o in outs)
    return state, outs


def _chunked_forward(q, k, v, slopes, docs, block, reverse):
    def step(state, blocks, dec, masks):
        q, k, v = blocks
        return _block_update(state, k, v, dec, masks), (_block_out(state, q, k, v, dec, masks),)

    state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), F32)
    state, (out,) = _sweep(step, (q, k, v), state, (v.shape[3],), slopes, docs, block, reverse)
    return out, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def chunked(q, k, v, slopes, docs, block, reverse=False):
    """Lightning attention from a zero state: `(out [B, T, N, Hv] fp32, final_state [B, N, H, Hv] fp32)`.

    Causal (`o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s`, final state after token T-1), or with `reverse`
    anti-causal (`o_t = sum_{s>=t} lambda^(s-t) ...`, final state before token 0). `slopes` `[N]` fp32 or None;
    it gets a zero cotangent (the public API stops its gradient). `docs`: document ids `[B, T]` int32 or None;
    the final state then holds the last document (the first one when `reverse`).
    """
    return _chunked_forward(q, k, v, slopes, docs, block, reverse)


def _chunked_fwd(q, k, v, slopes, docs, block, reverse):
    return _chunked_forward(q, k, v, slopes, docs, block, reverse), (q, k, v, slopes, docs)


def _key_value_grads(q, k, v, d_out, slopes, docs, block, reverse):
    """dK, dV (fp32) of the outputs of a sweep in the direction opposite to `reverse`."""
    def step(state, blocks, dec, masks):
        q, k, v, do = blocks
        dk = _block_out(jnp.swapaxes(state, -1, -2), v, do, q, dec, masks)
        dv = _block_out(state, k, q, do, dec, masks)
        return _block_update(state, q, do, dec, masks), (dk, dv)

    state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], d_out.shape[3]), F32)
    _, (dk, dv) = _sweep(step, (q, k, v, d_out), state, (k.shape[3], v.shape[3]), slopes, docs, block, reverse)
    return dk, dv


def _chunked_bwd(block, reverse, residuals, cotangents):
    q, k, v, slopes, docs = residuals
    d_out, d_state = cotangents
    dq, _ = chunked(d_out, v, k, slopes, docs, block, reverse)
    dk, dv = _key_value_grads(q, k, v, d_out, slopes, docs, block, not reverse)
    # The final state holds lambda^(distance to its end of the sequence) k_s^T v_s (of the end's document).
    t = q.shape[1]
    pos = jnp.arange(t, dtype=F32)
    to_end = decay_weights(slopes, pos if reverse else t - 1 - pos).T[None, :, :, None]  # [1, T, N, 1]
    if docs is not None:
        to_end = to_end * (docs == docs[:, :1] if reverse else docs == docs[:, -1:])[:, :, None, None]
    dk = dk + jnp.einsum("bsne,bnhe->bsnh", v.astype(F32), d_state) * to_end
    dv = dv + jnp.einsum("bsnh,bnhe->bsne", k.astype(F32), d_state) * to_end
    d_slopes = None if slopes is None else jnp.zeros_like(slopes)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_slopes, None


chunked.defvjp(_chunked_fwd, _chunked_bwd)


def lightning_chunked(query, key, value, slopes, initial_state, *, is_causal, block_size=DEFAULT_BLOCK,
                      segment_ids=None):
    """Returns `(out [B, T, N, Hv] in query dtype, final_state [B, N, H, Hv] fp32 or None when non-causal)`.

    Same semantics as `reference.lightning_reference` (`segment_ids` `[B, T]` included); memory O(T * block)
    forward and backward.
    """
    t = query.shape[1]
    block = max(1, min(int(block_size), t))
    docs = segments.document_ids(segment_ids)
    if not is_causal:
        return _bidirectional(query, key, value, slopes, docs, block).astype(query.dtype), None
    out, state = chunked(query, key, value, slopes, docs, block)
    if initial_state is not None:
        # The initial state sits just before token 0: token t sees it decayed by lambda^(t+1) (if in document 0).
        s0 = initial_state.astype(F32)
        pos = jnp.arange(t, dtype=F32)
        from_start = decay_weights(slopes, pos + 1).T[None, :, :, None]
        carried = s0 * decay_weights(slopes, jnp.asarray(float(t)))[None, :, None, None]
        if docs is not None:
            from_start = from_start * (docs == 0)[:, :, None, None]
            carried = carried * (docs[:, -1] == 0)[:, None, None, None]
        out = out + jnp.einsum("btnh,bnhe->btne", query.astype(F32), s0) * from_start
        state = state + carried
    return out.astype(query.dtype), state


def _bidirectional(query, key, value, slopes, docs, block):
    """`o_t = sum_s lambda^|t-s| (q_t . k_s) v_s` (pairs of one document only, with `docs`) in fp32."""
    if slopes is None and docs is None:  # no decay: q (K^T V), linear in T without any blocking
        kv = jnp.einsum("bsnh,bsne->bnhe", key, value, preferred_element_type=F32)
        return jnp.einsum("btnh,bnhe->btne", query.astype(F32), kv)
    # The causal and the anti-causal sweeps both count the diagonal s == t.
    causal, _ = chunked(query, key, value, slopes, docs, block, False)
    anti_causal, _ = chunked(query, key, value, slopes, docs, block, True)
    diag = jnp.einsum("btnh,btnh->btn", query, key, preferred_element_type=F32)[..., None] * value.astype(F32)
    return causal + anti_causal - diag
