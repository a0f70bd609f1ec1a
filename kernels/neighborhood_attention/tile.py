"""What one (query box, key box) tile computes, shared by the forward, dq and dk/dv kernel bodies.

Logits `q[bq, H] x k[bk, H]^T` in fp32, scaled, plus the relative position bias, with keys outside each query's
window at `-inf`. The window test is per axis, `lo <= m < hi`, from the int32 tables of `geometry.py` (query
bounds as columns `[bq, 1]`, key group indices as rows `[1, bk]`). The bias index of key `m` for query `ii` is
`sum_a (m_a - ii_a + k_a - 1) * stride_a` into the flattened `(2k1-1) x ..` table; the table row `[1, Pp]` is
expanded with one compare/select per entry (no gather: Mosaic has no vector gather), and its gradient is the sum
of `ds` over the same entries.
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


def _entry(row, r: int):
    """`row[0, r]` as a `[1, 1]` array, by a masked lane sum (no scalar extraction, which Mosaic lacks)."""
    lanes = lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(lanes == r, row, 0.0), axis=1, keepdims=True)


def bias(rel, table_row, size: int):
    """`table_row[0, rel]` for a `[bq, bk]` index and an fp32 `[1, Pp]` row holding `size` entries."""
    out = jnp.zeros(rel.shape, jnp.float32)
    for r in range(size):
        out = jnp.where(rel == r, _entry(table_row, r), out)
    return out


def bias_grad(rel, ds, size: int, width: int):
    """Adjoint of `bias`: `[1, width]` fp32 with `sum(ds[rel == r])` at lane `r`."""
    lanes = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    out = jnp.zeros((1, width), jnp.float32)
    for r in range(size):
        total = jnp.sum(jnp.sum(jnp.where(rel == r, ds, 0.0), axis=1, keepdims=True), axis=0, keepdims=True)
        out = out + jnp.where(lanes == r, total, 0.0)
    return out


def logits(q, k, scale: float, bounds, q_positions, k_positions, table_row, kernel):
    """Masked, biased fp32 logits `[bq, bk]` and the bias index (None without a bias table)."""
    s = matmul(q, k, transpose_b=True) * scale
    rel = None
    if table_row is not None:
        rel = bias_index(q_positions, k_positions, kernel)
        s = s + bias(rel, table_row, _size(kernel))
    return softmax.masked_logits(s, window_mask(bounds, k_positions)), rel


def _size(kernel) -> int:
    size = 1
    for k in kernel:
        size *= 2 * k - 1
    return size
