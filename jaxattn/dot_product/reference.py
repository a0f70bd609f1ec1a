"""Obviously-correct dot-product attention: materialises the full `T x S` logits in fp32. For tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.core import softmax
from jaxattn.dot_product import common


def reference_logits(query, key, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec):
    """The masked, scaled fp32 logits `[B, K, G, T, S]` (grouped queries; masked entries `-inf`)."""
    num_kv = key.shape[2]
    q = common.group_queries(query, num_kv).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(jnp.float32)) * scale
    if bias is not None:
        logits = logits + common.grouped_bnts(common.as_4d(bias), num_kv).astype(jnp.float32)
    t, s = query.shape[1], key.shape[1]
    full_mask = common.block_mask(
        spec, jnp.arange(t), jnp.arange(s), None, q_segment_ids, k_segment_ids,
        common.grouped_bnts(common.as_4d(mask), num_kv),
    )
    return softmax.masked_logits(logits, full_mask)


def attention_reference(query, key, value, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec):
    """Returns `(out [B, T, N, Hv] in query dtype, lse [B, N, T] fp32)`."""
    num_kv = key.shape[2]
    t = query.shape[1]
    logits = reference_logits(query, key, bias, mask, q_segment_ids, k_segment_ids, scale=scale, spec=spec)
    m, p, l = softmax.softmax_stats(logits)
    seen = l > 0
    out = jnp.einsum("bkgts,bskh->bkgth", p, value.astype(jnp.float32))
    out = out / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, softmax.finite_or_zero(m) + jnp.log(jnp.where(seen, l, 1.0)), softmax.NEG_INF)
    b, k, g, _ = lse.shape
    return common.ungroup_heads(out).astype(query.dtype), lse.reshape(b, k * g, t)


def attention_backward_reference(query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse, d_out,
                                 d_lse, *, scale, spec):
    """The backward formula from a given `out [B, T, N, Hv]` and `lse [B, N, T]`, materialised in fp32:
    `p = exp(s - lse)`, `ds = p * (d_out v^T - delta)`, `delta = rowsum(d_out * out) - d_lse`.
    Returns `(dq, dk, dv, dbias or None)` in the inputs' dtypes."""
    b, t, n, _ = query.shape
    num_kv = key.shape[2]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rows = lambda x: f32(x).reshape(b, num_kv, n // num_kv, t)  # noqa: E731  [B, N, T] -> [B, K, G, T]
    heads = lambda x: jnp.moveaxis(f32(common.group_queries(x, num_kv)), 1, 3)  # noqa: E731  -> [B, K, G, T, D]
    logits = reference_logits(query, key, bias, mask, q_segment_ids, k_segment_ids, scale=scale, spec=spec)
    p = jnp.exp(logits - softmax.finite_or_zero(rows(lse))[..., None])
    do = heads(d_out)
    delta = jnp.sum(do * heads(out), axis=-1) - (0.0 if d_lse is None else rows(d_lse))
    ds = p * (jnp.einsum("bkgth,bskh->bkgts", do, f32(value)) - delta[..., None])
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, f32(key)) * scale
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, f32(common.group_queries(query, num_kv))) * scale
    dv = jnp.einsum("bkgts,bkgth->bskh", p, do)
    dbias = None
    if bias is not None:
        grouped = common.grouped_bnts(common.as_4d(bias), num_kv).shape
        axes = tuple(i for i, (have, want) in enumerate(zip(ds.shape, grouped)) if want == 1 and have > 1)
        dbias = jnp.sum(ds, axis=axes, keepdims=True).reshape(bias.shape).astype(bias.dtype)
    return dq.reshape(query.shape).astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype), dbias


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
