"""Block-sparse dot-product attention in plain XLA: only the True blocks of a `block_mask` are computed.

A `lax.scan` walks the query blocks; for each, a `fori_loop` with a data-dependent trip count (a while loop)
visits the key blocks listed by `block_sparse.visit_lists` (True blocks first), gathering one key/value block per
(batch, head) at a time. Work and memory traffic therefore scale with the number of True blocks, never with
`T x S` (no dense mask, no `T x S` logits). A query block runs as many steps as the densest (batch, head) row of
that block; a row with fewer True blocks masks its extra steps.

A mask shared by all heads (`block_mask` of head dim 1) gathers each key block once per kv head; a per-head mask
gathers per query head. The backward (`custom_vjp`) repeats the walk, recomputing `p = exp(s - lse)`, and
scatter-adds dk/dv into the visited key blocks. Composes with causal / windows (single or per head) / segments /
`kv_lengths` / soft-cap (a dense `bias` or `mask` takes the per-key-block path of `xla.py` instead).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.core import block_sparse, blocking, masks, softmax
from jaxattn.dot_product import common

# einsum strings per gather mode: key blocks `[B, bk, K, H]` (mask shared by heads) or `[B, K, G, bk, H]`.
_EQ = {
    False: dict(logits="bqkgh,bskh->bkgqs", pv="bkgqs,bskh->bkgqh", dq="bkgqs,bskh->bqkgh", dk="bkgqs,bqkgh->bskh",
                dv="bkgqs,bkgqh->bskh", dp="bkgqh,bskh->bkgqs"),
    True: dict(logits="bqkgh,bkgsh->bkgqs", pv="bkgqs,bkgsh->bkgqh", dq="bkgqs,bkgsh->bqkgh",
               dk="bkgqs,bqkgh->bkgsh", dv="bkgqs,bkgqh->bkgsh", dp="bkgqh,bkgsh->bkgqs"),
}


def attention_block_sparse(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, *, scale,
                           spec):
    """Returns `(out [B, T, N, Hv] in query dtype, lse [B, N, T] fp32)`; `spec.block_shape` is `(bq, bk)`."""
    return _attention(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec)


class _Walk:
    """The padded, blocked operands and the visit lists; `tile(...)` builds one (query block, key block) tile."""

    def __init__(self, query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec):
        b, t, n, _ = query.shape
        s, num_kv = key.shape[1], key.shape[2]
        bq, bk = spec.block_shape
        nq, nk = block_sparse.grid_shape(t, s, spec.block_shape)
        self.b, self.t, self.n, self.s, self.num_kv, self.g = b, t, n, s, num_kv, n // num_kv
        self.bq, self.bk, self.nq, self.nk, self.scale, self.spec = bq, bk, nq, nk, scale, spec
        self.per_head = block_mask.shape[1] != 1
        self.eq = _EQ[self.per_head]

        def by_block(x):  # [B, S, ...] -> [B, nk, bk, ...]
            x = blocking.pad_axis(x, 1, nk * bk, -1 if x.ndim == 2 else 0)
            return x.reshape(b, nk, bk, *x.shape[2:])
        self.k, self.v = by_block(key), by_block(value)
        self.kseg = None if k_segment_ids is None else by_block(k_segment_ids)
        full = jnp.broadcast_to(block_mask, (b, block_mask.shape[1], nq, nk))
        indices, counts = block_sparse.visit_lists(full)
        if self.per_head:
            indices, counts = (x.reshape(b, num_kv, self.g, *x.shape[2:]) for x in (indices, counts))
        else:
            indices, counts = indices[:, 0], counts[:, 0]  # [B, nq, nk], [B, nq]
        self.indices = jnp.moveaxis(indices, -2, 0)  # [nq, B, (K, G,) nk]
        self.counts = jnp.moveaxis(counts, -1, 0)  # [nq, B, (K, G)]
        self.steps = jnp.max(self.counts.reshape(nq, -1), axis=1)  # [nq]: the densest row of each query block
        self.alignment = common.cache_alignment(kv_lengths, t, s)
        self.q_segment_ids = q_segment_ids

    def query_blocks(self, x, value=0):
        """`[B, T, ...]` -> `[nq, B, bq, ...]`."""
        return None if x is None else blocking.split_blocks(x, 1, self.bq, value)

    def gather(self, blocks, index):
        """Key blocks `[B, nk, bk, ...]` at `index` (`[B]` or `[B, K, G]`) -> `[B, bk, ...]` or `[B, K, G, bk, H]`."""
        bi = jnp.arange(self.b)
        if not self.per_head:
            return blocks[bi, index]
        if blocks.ndim == 3:  # segment ids [B, nk, bk] -> [B, K, G, bk]
            return blocks[bi[:, None, None], index]
        return blocks[bi[:, None, None], index, :, jnp.arange(self.num_kv)[None, :, None]]

    def tile(self, q_blk, q_pos, q_seg, index, valid):
        """`(masked fp32 logits [B, K, G, bq, bk], soft-cap derivative or None, k block, v block)`."""
        k_blk, v_blk = self.gather(self.k, index), self.gather(self.v, index)
        logits = jnp.einsum(self.eq["logits"], q_blk, k_blk, preferred_element_type=jnp.float32) * self.scale
        cap = self.spec.logits_soft_cap
        logits = softmax.soft_cap(logits, cap)
        cap_grad = None if cap is None else softmax.soft_cap_derivative(logits, cap)
        lead = (self.b, self.num_kv, self.g) if self.per_head else (self.b, 1, 1)
        k_pos = (index[..., None] * self.bk + jnp.arange(self.bk)).reshape(*lead, 1, self.bk)
        pos = common.position_mask(self.spec, q_pos[:, None], k_pos, self.s if self.s % self.bk else None,
                                   num_kv_heads=self.num_kv, alignment=self.alignment)
        live = (valid.reshape(*lead, 1, 1)) & (q_pos < self.t)[:, None]
        seg = None
        if q_seg is not None:
            k_seg = self.gather(self.kseg, index).reshape(*lead, 1, self.bk)
            seg = q_seg[:, None, None, :, None] == k_seg
        return softmax.masked_logits(logits, masks.combine(pos, live, seg)), cap_grad, k_blk, v_blk

    def grouped_queries(self, query):
        return self.query_blocks(common.group_queries(query, self.num_kv))  # [nq, B, bq, K, G, H]

    def rows_to_heads(self, x):
        """`[nq, B, K, G, bq, ...]` -> `[B, T, N, ...]`."""
        trailing = x.shape[5:]
        x = jnp.moveaxis(x, 4, 1)  # [nq, bq, B, K, G, ...]
        x = jnp.moveaxis(x.reshape(self.nq * self.bq, *x.shape[2:]), 0, 1)[:, :self.t]
        return x.reshape(self.b, self.t, self.n, *trailing)


def _forward(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec):
    walk = _Walk(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec)
    hv = value.shape[-1]
    xs = (walk.grouped_queries(query), jnp.arange(walk.nq * walk.bq).reshape(walk.nq, walk.bq),
          walk.query_blocks(q_segment_ids, -2), walk.indices, walk.counts, walk.steps)

    def per_query_block(_, x):
        q_blk, q_pos, q_seg, indices, counts, steps = x

        def visit(i, carry):
            logits, _, _, v_blk = walk.tile(q_blk, q_pos, q_seg, indices[..., i], i < counts)
            return softmax.online_softmax_update(
                carry, logits, v_blk,
                lambda p, v: jnp.einsum(walk.eq["pv"], p.astype(v.dtype), v, preferred_element_type=jnp.float32))

        carry = softmax.online_softmax_init((walk.b, walk.num_kv, walk.g, walk.bq), hv)
        out, lse = softmax.online_softmax_finalize(jax.lax.fori_loop(0, steps, visit, carry))
        return None, (out, lse)

    _, (out, lse) = jax.lax.scan(per_query_block, None, xs)
    out = walk.rows_to_heads(out).astype(query.dtype)
    lse = jnp.moveaxis(walk.rows_to_heads(lse[..., None])[..., 0], 1, 2)  # [B, N, T]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec):
    return _forward(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec)


def _attention_fwd(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec):
    out, lse = _forward(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec)
    return (out, lse), (query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, out, lse)


def _attention_bwd(scale, spec, residuals, cotangents):
    query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, out, lse = residuals
    d_out, d_lse = cotangents
    walk = _Walk(query, key, value, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec)
    f32 = jnp.float32

    def rows(x):  # [B, T, N, D] -> [nq, B, K, G, bq, D] fp32
        x = walk.grouped_queries(x.astype(f32))  # [nq, B, bq, K, G, D]
        return jnp.moveaxis(x, 2, 4)

    do = rows(d_out)
    delta = rows(jnp.swapaxes(softmax.backward_delta_heads_last(out, d_out, d_lse), 1, 2)[..., None])[..., 0]
    lse_rows = softmax.finite_or_zero(rows(jnp.swapaxes(lse, 1, 2)[..., None])[..., 0])
    xs = (walk.grouped_queries(query), jnp.arange(walk.nq * walk.bq).reshape(walk.nq, walk.bq),
          walk.query_blocks(q_segment_ids, -2), walk.indices, walk.counts, walk.steps, do, delta, lse_rows)
    bi = jnp.arange(walk.b)

    def scatter_add(acc, index, x):
        if not walk.per_head:
            return acc.at[bi, index].add(x)
        return acc.at[bi[:, None, None], index, :, jnp.arange(walk.num_kv)[None, :, None]].add(x)

    def per_query_block(carry, x):
        q_blk, q_pos, q_seg, indices, counts, steps, do_blk, delta_blk, lse_blk = x

        def visit(i, inner):
            dq, dk_acc, dv_acc = inner
            index = indices[..., i]
            logits, cap_grad, k_blk, v_blk = walk.tile(q_blk, q_pos, q_seg, index, i < counts)
            p = jnp.exp(logits - lse_blk[..., None])  # masked -> 0
            dp = jnp.einsum(walk.eq["dp"], do_blk, v_blk.astype(f32))
            ds = p * (dp - delta_blk[..., None])
            if cap_grad is not None:
                ds = ds * cap_grad
            dq = dq + jnp.einsum(walk.eq["dq"], ds, k_blk.astype(f32)) * scale
            dk_acc = scatter_add(dk_acc, index, jnp.einsum(walk.eq["dk"], ds, q_blk.astype(f32)) * scale)
            dv_acc = scatter_add(dv_acc, index, jnp.einsum(walk.eq["dv"], p, do_blk))
            return dq, dk_acc, dv_acc

        dk_acc, dv_acc = carry
        dq0 = jnp.zeros(q_blk.shape, f32)
        dq, dk_acc, dv_acc = jax.lax.fori_loop(0, steps, visit, (dq0, dk_acc, dv_acc))
        return (dk_acc, dv_acc), dq

    init = (jnp.zeros(walk.k.shape, f32), jnp.zeros(walk.v.shape, f32))
    (dk, dv), dq = jax.lax.scan(per_query_block, init, xs)
    dq = blocking.merge_blocks(dq, 1, walk.t).reshape(query.shape).astype(query.dtype)  # [nq, B, bq, K, G, H]
    dk = dk.reshape(walk.b, walk.nk * walk.bk, *key.shape[2:])[:, :walk.s].astype(key.dtype)
    dv = dv.reshape(walk.b, walk.nk * walk.bk, *value.shape[2:])[:, :walk.s].astype(value.dtype)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
