"""Obviously-correct dot-product attention: materialises the full `T x S` logits in fp32. For tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.core import softmax
from jaxattn.dot_product import common


def attention_reference(query, key, value, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec):
    """Returns `(out [B, T, N, Hv] in query dtype, lse [B, N, T] fp32)`."""
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
    logits = softmax.masked_logits(logits, full_mask)
    m, p, l = softmax.softmax_stats(logits)
    seen = l > 0
    out = jnp.einsum("bkgts,bskh->bkgth", p, value.astype(jnp.float32))
    out = out / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, softmax.finite_or_zero(m) + jnp.log(jnp.where(seen, l, 1.0)), softmax.NEG_INF)
    b, k, g, _ = lse.shape
    return common.ungroup_heads(out).astype(query.dtype), lse.reshape(b, k * g, t)


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
