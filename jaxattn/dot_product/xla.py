"""Blocked dot-product attention in plain XLA: an online softmax over key blocks (`lax.scan`).

Peak memory is O(T * block_k) per head instead of O(T * S). The backward pass is a `custom_vjp` that recomputes
each block's probabilities from the saved log-sum-exp (FlashAttention-2 style), so nothing `T x S` is stored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.core import block_sparse, blocking, masks, softmax
from jaxattn.dot_product import common
from jaxattn.core import vma

DEFAULT_BLOCK_K = 512


def attention_blocked(query, key, value, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec,
                      block_k=DEFAULT_BLOCK_K, kv_lengths=None, block_mask=None):
    """Returns `(out [B, T, N, Hv] in query dtype, lse [B, N, T] fp32)`.

    With a `block_mask` (and `spec.block_shape`) and no dense `bias`/`mask`, only the True blocks are computed
    (`xla_block_sparse`); with a dense `bias` or `mask` the key blocks are `block_shape[1]` wide and the block mask
    is applied per key block (every block computed)."""
    if block_mask is not None:
        if bias is None and mask is None:
            from jaxattn.dot_product import xla_block_sparse
            return xla_block_sparse.attention_block_sparse(query, key, value, q_segment_ids, k_segment_ids,
                                                           kv_lengths, block_mask, scale=scale, spec=spec)
        block_k = spec.block_shape[1]
    block_k = max(1, min(block_k, key.shape[1]))
    return _attention(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale,
                      spec, block_k)


def _key_blocks(key, value, bias, mask, k_segment_ids, block_k):
    """Stacks everything indexed by key position into `[num_blocks, ...]` scan inputs."""
    num_kv = key.shape[2]
    bias_g = common.grouped_bnts(common.as_4d(bias), num_kv)
    mask_g = common.grouped_bnts(common.as_4d(mask), num_kv)
    nb = blocking.num_blocks(key.shape[1], block_k)
    xs = {
        "k": blocking.split_blocks(key, 1, block_k),
        "v": blocking.split_blocks(value, 1, block_k),
        "pos": jnp.arange(nb * block_k).reshape(nb, block_k),
        "index": jnp.arange(nb),
        "bias": blocking.split_blocks(bias_g, -1, block_k, broadcast_ones=True),
        "mask": blocking.split_blocks(mask_g, -1, block_k, value=False, broadcast_ones=True),
        "kseg": blocking.split_blocks(k_segment_ids, 1, block_k, value=-1),
    }
    # Arrays broadcast along keys (last dim 1) are not split; the body uses them whole.
    whole = {"bias": bias_g if xs["bias"] is None else None, "mask": mask_g if xs["mask"] is None else None}
    return xs, whole


class _Rows:
    """What every key block is combined with: the grouped queries and the per-query parts of the masks."""

    def __init__(self, query, key, q_segment_ids, kv_lengths, block_mask, scale, spec, block_k):
        t, s, num_kv = query.shape[1], key.shape[1], key.shape[2]
        self.q = common.group_queries(query, num_kv)
        self.pos = jnp.arange(t)
        self.segment_ids = q_segment_ids
        self.kv_length = s if s % block_k else None
        self.alignment = common.cache_alignment(kv_lengths, t, s)
        self.block_mask = common.grouped_bnts(block_mask, num_kv)
        self.scale, self.spec, self.num_kv = scale, spec, num_kv

    def logits(self, blk, whole):
        """`(masked logits, d capped / d raw or None)` of one key block, `[B, K, G, T, keys]` fp32."""
        logits = jnp.einsum("btkgh,bskh->bkgts", self.q, blk["k"], preferred_element_type=jnp.float32) * self.scale
        cap = self.spec.logits_soft_cap
        logits = softmax.soft_cap(logits, cap)
        cap_grad = None if cap is None else softmax.soft_cap_derivative(logits, cap)
        bias = blk["bias"] if blk["bias"] is not None else whole["bias"]
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        mask = blk["mask"] if blk["mask"] is not None else whole["mask"]
        if self.block_mask is not None:
            rows = block_sparse.rows_of_key_block(self.block_mask, self.spec.block_shape, self.pos, blk["index"])
            mask = masks.combine(mask, rows[..., None])
        block_mask = common.block_mask(self.spec, self.pos, blk["pos"], self.kv_length, self.segment_ids,
                                       blk["kseg"], mask, num_kv_heads=self.num_kv, alignment=self.alignment)
        return softmax.masked_logits(logits, block_mask), cap_grad


def _prob_times_value(p, v_blk):
    return jnp.einsum("bkgts,bskh->bkgth", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)


def _forward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec,
             block_k):
    b, t, n, _ = query.shape
    num_kv, hv = key.shape[2], value.shape[-1]
    rows = _Rows(query, key, q_segment_ids, kv_lengths, block_mask, scale, spec, block_k)
    xs, whole = _key_blocks(key, value, bias, mask, k_segment_ids, block_k)

    def body(carry, blk):
        logits, _ = rows.logits(blk, whole)
        return softmax.online_softmax_update(carry, logits, blk["v"], _prob_times_value), None

    carry = softmax.online_softmax_init((b, num_kv, n // num_kv, t), hv)
    # Varying like the inputs inside a `shard_map` with check_vma (a fresh carry is device-invariant).
    carry, _ = jax.lax.scan(body, vma.varying_like(carry, xs, whole, query, q_segment_ids), xs)
    out, lse = softmax.online_softmax_finalize(carry)
    return common.ungroup_heads(out).astype(query.dtype), lse.reshape(b, n, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _attention(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale, spec,
               block_k):
    return _forward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale,
                    spec, block_k)


def _attention_fwd(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale,
                   spec, block_k):
    out, lse = _forward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, scale,
                        spec, block_k)
    return (out, lse), (query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, out,
                        lse)


def _reduce_to(x, shape):
    """Sums `x` over the axes where `shape` has 1 (the broadcast axes of a bias)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _attention_bwd(scale, spec, block_k, residuals, cotangents):
    query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, dbias = _backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths,
                                  block_mask, lse, d_out, softmax.backward_delta_heads_last(out, d_out, d_lse),
                                  scale, spec, block_k)
    return dq, dk, dv, dbias, None, None, None, None, None


def attention_blocked_backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse, d_out,
                               d_lse, *, scale, spec, block_k=DEFAULT_BLOCK_K, kv_lengths=None, block_mask=None,
                               delta=None):
    """The blocked backward alone: `(dq, dk, dv, dbias or None)` from the saved `out [B, T, N, Hv]` and
    `lse [B, N, T]` (fp32), `d_out` like `out` and `d_lse [B, N, T]` or None. Recomputes `p = exp(s - lse)`
    per key block and uses `delta = rowsum(d_out * out) - d_lse` (`softmax.backward_delta_heads_last`), or the
    given fp32 `delta [B, N, T]`, and then reads neither `out` nor `d_lse`; no forward pass is repeated. A
    `block_mask` is applied per key block here (every block computed)."""
    if block_mask is not None:
        block_k = spec.block_shape[1]
    block_k = max(1, min(block_k, key.shape[1]))
    if delta is None:
        delta = softmax.backward_delta_heads_last(out, d_out, d_lse)
    return _backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, lse,
                     d_out, delta, scale, spec, block_k)


def _backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, kv_lengths, block_mask, lse, d_out,
              delta, scale, spec, block_k):
    b, t, n, h = query.shape
    s, num_kv = key.shape[1], key.shape[2]
    g = n // num_kv
    rows = _Rows(query, key, q_segment_ids, kv_lengths, block_mask, scale, spec, block_k)
    q_grouped = rows.q
    xs, whole = _key_blocks(key, value, bias, mask, k_segment_ids, block_k)

    def grouped_rows(x):  # [B, N, T] -> [B, K, G, T]
        return x.reshape(b, num_kv, g, t)

    lse_safe = softmax.finite_or_zero(grouped_rows(lse))[..., None]
    do_g = jnp.moveaxis(common.group_queries(d_out, num_kv), 1, 3)  # [B, K, G, T, Hv]
    delta = grouped_rows(delta)
    bias_g = common.grouped_bnts(common.as_4d(bias), num_kv)
    bias_keys_whole = bias is not None and xs["bias"] is None

    def body(carry, blk):
        dq, dbias_whole = carry
        logits, cap_grad = rows.logits(blk, whole)
        p = jnp.exp(logits - lse_safe)  # masked logits are -inf -> 0
        dv = jnp.einsum("bkgts,bkgth->bskh", p.astype(do_g.dtype), do_g, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgth,bskh->bkgts", do_g, blk["v"], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        ds_raw = ds if cap_grad is None else ds * cap_grad  # through the soft-cap, which precedes the bias
        dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds_raw, blk["k"].astype(jnp.float32)) * scale
        dk = jnp.einsum("bkgts,btkgh->bskh", ds_raw, q_grouped.astype(jnp.float32)) * scale
        dbias_blk = None
        if bias is not None:
            db = _reduce_to(ds, bias_g.shape[:-1] + (ds.shape[-1],))
            if bias_keys_whole:
                dbias_whole = dbias_whole + jnp.sum(db, axis=-1, keepdims=True)
            else:
                dbias_blk = db
        return (dq, dbias_whole), (dk, dv, dbias_blk)

    dq0 = jnp.zeros(q_grouped.shape, jnp.float32)
    db0 = jnp.zeros(bias_g.shape, jnp.float32) if bias_keys_whole else None
    init = vma.varying_like((dq0, db0), xs, whole, query, q_segment_ids, lse, d_out, delta)
    (dq, dbias_whole), (dk, dv, dbias_blocks) = jax.lax.scan(body, init, xs)
    dk = blocking.merge_blocks(dk, 1, s).astype(key.dtype)
    dv = blocking.merge_blocks(dv, 1, s).astype(value.dtype)
    dq = dq.reshape(query.shape).astype(query.dtype)
    dbias = None
    if bias is not None:
        db = dbias_whole if bias_keys_whole else blocking.merge_blocks(dbias_blocks, -1, s)
        dbias = db.reshape(bias.shape).astype(bias.dtype)
    return dq, dk, dv, dbias


_attention.defvjp(_attention_fwd, _attention_bwd)
