"""Obviously-correct bi-level routing attention, the gather-based form of the official BiFormer
(`ops/bra_legacy.py`): gather the top-k key/value regions of every query region (k-fold copies), then one dense
softmax per query region and head over all gathered tokens, in fp32. The ground truth of the tests; its memory is
what the XLA path avoids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.routing import common


def _regions(x, num_regions):
    """BiFormer's `rearrange(x, 'n (j h) (i w) c -> n (j i) (h w) c')`, kept literal (independent of core tiling)."""
    b, hh, ww, *rest = x.shape
    sj, si = num_regions
    x = x.reshape(b, sj, hh // sj, si, ww // si, *rest)
    x = x.transpose(0, 1, 3, 2, 4, *range(5, x.ndim))
    return x.reshape(b, sj * si, (hh // sj) * (ww // si), *rest)


def routed_attention_reference(query, key, value, indices, *, num_regions, scale):
    """Attention of each query region to the key regions `indices [B, R, topk]`; `[B, H, W, N, Dv]` out."""
    b, hh, ww, n, _ = query.shape
    sj, si = num_regions
    q, k, v = (_regions(x.astype(jnp.float32), num_regions) for x in (query, key, value))  # [B, R, T, N, D]
    batch = jnp.arange(b)[:, None, None]
    k_sel, v_sel = k[batch, indices], v[batch, indices]  # [B, R, topk, T, N, D]: the k-fold copies
    k_sel = k_sel.reshape(*k_sel.shape[:2], -1, *k_sel.shape[4:])  # [B, R, topk*T, N, D]
    v_sel = v_sel.reshape(*v_sel.shape[:2], -1, *v_sel.shape[4:])
    logits = jnp.einsum("brtnd,brsnd->brnts", q * scale, k_sel)
    out = jnp.einsum("brnts,brsnd->brtnd", jax.nn.softmax(logits, axis=-1), v_sel)
    out = out.reshape(b, sj, si, hh // sj, ww // si, n, -1).transpose(0, 1, 3, 2, 4, 5, 6)
    return out.reshape(b, hh, ww, n, -1).astype(query.dtype)


def bilevel_routing_reference(query, key, value, *, num_regions, topk, scale):
    indices = common.select_regions(query, key, num_regions, topk, scale)
    return routed_attention_reference(query, key, value, indices, num_regions=num_regions, scale=scale)
