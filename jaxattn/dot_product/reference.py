"""Obviously-correct dot-product attention: materialises the full `T x S` logits in fp32. For tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.core import block_sparse, masks, softmax
from jaxattn.dot_product import common


def factors_bias(bias_factors, num_heads):
    """FlashBias factors `(u [B, T, N, R], w [B, S, N or K, R])` -> the materialised bias `u . w`, `[B, N, T, S]`
    fp32 (the reference's ground truth; the other paths extend the head dim instead)."""
    u, w = (x.astype(jnp.float32) for x in bias_factors)
    w = jnp.repeat(w, num_heads // w.shape[2], axis=2)
    return jnp.einsum("btnr,bsnr->bnts", u, w)


def reference_logits(query, key, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec, kv_lengths=None,
                     block_mask=None):
    """The masked, scaled fp32 logits `[B, K, G, T, S]` (grouped queries; masked entries `-inf`), soft-capped
    before the bias when `spec.logits_soft_cap` is set."""
    num_kv = key.shape[2]
    q = common.group_queries(query, num_kv).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(jnp.float32)) * scale
    logits = softmax.soft_cap(logits, spec.logits_soft_cap)
    if bias is not None:
        logits = logits + common.grouped_bnts(common.as_4d(bias), num_kv).astype(jnp.float32)
    t, s = query.shape[1], key.shape[1]
    dense_blocks = None
    if block_mask is not None:
        dense_blocks = common.grouped_bnts(block_sparse.expand(block_mask, spec.block_shape, t, s), num_kv)
    full_mask = common.block_mask(
        spec, jnp.arange(t), jnp.arange(s), None, q_segment_ids, k_segment_ids,
        common.grouped_bnts(common.as_4d(mask), num_kv), num_kv_heads=num_kv,
        alignment=common.cache_alignment(kv_lengths, t, s),
    )
    return softmax.masked_logits(logits, masks.combine(full_mask, dense_blocks))


def _grouped_sinks(sinks, num_kv):
    """`[N]` -> `[1, K, G, 1]` fp32, broadcastable to grouped rows `[B, K, G, T]`."""
    return sinks.astype(jnp.float32).reshape(1, num_kv, -1, 1)


def attention_reference(query, key, value, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec, sinks=None,
                        kv_lengths=None, block_mask=None, bias_factors=None):
    """Returns `(out [B, T, N, Hv] in query dtype, lse [B, N, T] fp32)`. Sinks join the softmax as one more
    value-less column of logits; `bias_factors` are materialised into the bias."""
    num_kv = key.shape[2]
    b, t, n, _ = query.shape
    if bias_factors is not None:
        low_rank = factors_bias(bias_factors, n)
        bias = low_rank if bias is None else bias.astype(jnp.float32) + low_rank
    logits = reference_logits(query, key, bias, mask, q_segment_ids, k_segment_ids, scale=scale, spec=spec,
                              kv_lengths=kv_lengths, block_mask=block_mask)
    if sinks is not None:
        column = jnp.broadcast_to(_grouped_sinks(sinks, num_kv)[..., None], logits.shape[:-1] + (1,))
        logits = jnp.concatenate([logits, column], axis=-1)
    m, p, l = softmax.softmax_stats(logits)
    if sinks is not None:
        p = p[..., :-1]
    seen = l > 0
    out = jnp.einsum("bkgts,bskh->bkgth", p, value.astype(jnp.float32))
    out = out / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, softmax.finite_or_zero(m) + jnp.log(jnp.where(seen, l, 1.0)), softmax.NEG_INF)
    return common.ungroup_heads(out).astype(query.dtype), lse.reshape(b, n, t)


def attention_backward_reference(query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse, d_out,
                                 d_lse, *, scale, spec, kv_lengths=None, block_mask=None, delta=None):
    """The backward formula from a given `out [B, T, N, Hv]` and `lse [B, N, T]`, materialised in fp32:
    `p = exp(s - lse)`, `ds = p * (d_out v^T - delta)`, `delta = rowsum(d_out * out) - d_lse` (or the given fp32
    `delta [B, N, T]`; `out` and `d_lse` are then not read), then `ds` pulled back through the logits (soft-cap
    included) by autodiff. Returns `(dq, dk, dv, dbias or None)` in the inputs' dtypes."""
    b, t, n, _ = query.shape
    num_kv = key.shape[2]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rows = lambda x: f32(x).reshape(b, num_kv, n // num_kv, t)  # noqa: E731  [B, N, T] -> [B, K, G, T]
    heads = lambda x: jnp.moveaxis(f32(common.group_queries(x, num_kv)), 1, 3)  # noqa: E731  -> [B, K, G, T, D]

    def logits_of(q, k, bias_):
        return reference_logits(q, k, bias_, mask, q_segment_ids, k_segment_ids, scale=scale, spec=spec,
                                kv_lengths=kv_lengths, block_mask=block_mask)

    logits, pullback = jax.vjp(logits_of, f32(query), f32(key), None if bias is None else f32(bias))
    p = jnp.exp(logits - softmax.finite_or_zero(rows(lse))[..., None])
    do = heads(d_out)
    if delta is None:
        delta = softmax.backward_delta_heads_last(out, d_out, d_lse)
    ds = p * (jnp.einsum("bkgth,bskh->bkgts", do, f32(value)) - rows(delta)[..., None])
    dq, dk, dbias = pullback(ds)
    dv = jnp.einsum("bkgts,bkgth->bskh", p, do)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype), dbias


def attention_naive(query, key, value, *, scale=None, is_causal=False):
    """The textbook formula with repeated k/v heads (no masking tricks); a second opinion in tests."""
    n, kv = query.shape[2], key.shape[2]
    key, value = jnp.repeat(key, n // kv, axis=2), jnp.repeat(value, n // kv, axis=2)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", query, key) * scale
    if is_causal:
        t, s = query.shape[1], key.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, s), bool), k=s - t), logits, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), value)
