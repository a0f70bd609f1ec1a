"""What one (query tile, key box) pair computes, shared by the forward, dq and dk/dv kernel bodies.

Logits `q[bq, H] x k[bk, H]^T` in fp32, scaled, plus the relative position bias, with keys outside each query's
window at `-inf`. The window test is per axis, `lo <= m < hi`, from the int32 tables of `geometry.py` (query
bounds as columns `[bq, 1]`, key group indices as rows `[1, bk]`). The bias of a tile depends only on the offset
between its key box and query tile, so the kernels read one of a few precomputed `[bq, bk]` tiles
(`Geometry.bias_index`). Its gradient is summed in the dq kernel per table entry: the index of key `m` for query
`ii` is `sum_a (m_a - ii_a + k_a - 1) * stride_a` into the flattened `(2k1-1) x ..` table, and each entry takes
one compare/select/sum over the tile (no gather or scatter: Mosaic has neither on vectors).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from jaxattn.core import softmax
from jaxattn.kernels.flash_attention.tile import matmul


def window_mask(bounds: Sequence, positions: Sequence):
    """bounds: per axis `(lo [bq, 1], hi [bq, 1])`; positions: per axis `m [1, bk]` -> bool `[bq, bk]`."""
    keep = None
    for (lo, hi), m in zip(bounds, positions):
        inside = (m >= lo) & (m < hi)
        keep = inside if keep is None else keep & inside
    return keep


def bias_index(q_positions: Sequence, k_positions: Sequence, kernel: Sequence[int]):
    """Flat relative-position index `[bq, bk]` (meaningful inside the window only)."""
    rel = None
    for ii, m, k in zip(q_positions, k_positions, kernel):
        r = m - ii + (k - 1)
        rel = r if rel is None else rel * (2 * k - 1) + r
    return rel


def bias_grad(rel, ds, size: int, width: int):
    """Gradient of the flattened bias table: `[1, width]` fp32 with `sum(ds[rel == r])` at lane `r`."""
    lanes = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    out = jnp.zeros((1, width), jnp.float32)
    for r in range(size):
        total = jnp.sum(jnp.sum(jnp.where(rel == r, ds, 0.0), axis=1, keepdims=True), axis=0, keepdims=True)
        out = out + jnp.where(lanes == r, total, 0.0)
    return out


def logits(q, k, scale: float, bounds, k_positions, bias_tile=None):
    """Masked fp32 logits `[bq, bk]`: scaled `q k^T`, plus the tile's precomputed bias `[bq, bk]` (or None)."""
    s = matmul(q, k, transpose_b=True) * scale
    if bias_tile is not None:
        s = s + bias_tile
    return softmax.masked_logits(s, window_mask(bounds, k_positions))
