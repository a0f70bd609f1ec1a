"""Blocked neighborhood attention in plain XLA: query tiles against their key halos.

Every problem is handled as 3-D (missing axes become unit axes with kernel 1). Along each axis the tokens are
viewed in dilation-group coordinates and cut into query tiles; a tile attends to the contiguous halo of keys that
holds all of its windows (`jaxattn.neighborhood.tiling`), with the exact window as an additive `-inf` mask and
the relative position bias expanded from per-axis one-hot tables (a matmul, so its gradient needs no scatter).
Logits exist only per tile, `O(tokens * prod(halo))`, never `tokens x tokens`. Tiles along the first axis are
processed in chunks under `lax.map` + `jax.checkpoint`, so forward and backward memory stay bounded by
`logit_budget` per chunk however large the input.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import blocking
from jaxattn.neighborhood import tiling, windows

# fp32 logits per chunk (elements, 2 MiB): chunks that stay in cache beat one big pass (measured on CPU).
LOGIT_BUDGET = 1 << 19

# Dimension letters. Per axis: dilation group, tile index, query in tile, key in halo, rpb offset.
#   axis 0: a t x X P | axis 1: c u y Y Q | axis 2: e w z Z R
# Inside a chunk everything is laid out for one batched matmul: batch (b k c u e w a t), rows (g x y z),
# keys (X Y Z), so masks and biases are `[tiles, queries, keys]` tables broadcast over batch and heads.
TILE_DIMS = "cuewat"
ONE_HOT_DIMS = ("atxXP", "cuyYQ", "ewzZR")
BIAS_DIMS = "k" + TILE_DIMS + "gxyzXYZ"


def _place(x, src: str, dst: str):
    """Transposes `x` (dims named by `src`) into the order of `dst`, with size-1 axes for dims it lacks."""
    present = sorted(src, key=dst.index)
    x = jnp.transpose(x, [src.index(c) for c in present])
    return x.reshape([x.shape[present.index(c)] if c in src else 1 for c in dst])


def _pad_axes(x, lengths):
    for axis, target in enumerate(lengths, start=1):
        x = blocking.pad_axis(x, axis, target)
    return x


def _plans(spatial, spec: windows.NASpec, tile, batch_heads: int, logit_budget: int):
    """Per-axis tile tables (3 of them) and the number of first-axis tiles per chunk."""
    nd = len(spatial)
    axes = [(length, *spec.axis(a)) for a, length in enumerate(spatial)] + [(1, 1, 1, 1, False)] * (3 - nd)
    if tile is None or isinstance(tile, int):
        tile = (tile,) * nd
    sizes = [t or tiling.default_tile(axes[a][0], axes[a][1], axes[a][2], axes[a][3], nd)
             for a, t in enumerate(tile)] + [1] * (3 - nd)
    plans = [tiling.axis_tiles(*axes[a], sizes[a]) for a in range(3)]
    p0, p1, p2 = plans
    row = batch_heads * p0.groups * p1.groups * p2.groups * p1.num_tiles * p2.num_tiles
    row *= math.prod(p.tile * p.span for p in plans)
    per_chunk = max(1, min(p0.num_tiles, logit_budget // row))
    n_chunks = math.ceil(p0.num_tiles / per_chunk)
    per_chunk = math.ceil(p0.num_tiles / n_chunks)
    if n_chunks * per_chunk != p0.num_tiles:
        plans[0] = tiling.axis_tiles(*axes[0], sizes[0], n_chunks * per_chunk)
    return plans, n_chunks, per_chunk


def _additive_mask(plan: tiling.AxisTiles):
    return np.where(plan.mask, np.float32(0), np.float32(-np.inf))


def _halos(x, index0, plans):
    """Padded keys `[B, Lk1, Lk2, Lk3, K, D]` -> one chunk's halos `[B * K * tiles, keys, D]`.

    `index0` `[a, t, X]` picks the chunk's first-axis halos; tiles are ordered `(c u e w a t)`, keys `(X Y Z)`.
    """
    _, p1, p2 = plans
    for axis, index in ((1, index0), (2, p1.key_index), (3, p2.key_index)):
        x = jnp.take(x, index.reshape(-1), axis=axis, mode="clip")
    b, num_kv, d = x.shape[0], x.shape[-2], x.shape[-1]
    x = x.reshape((b,) + index0.shape + p1.key_index.shape + p2.key_index.shape + (num_kv, d))
    x = jnp.transpose(x, (0, 10, 4, 5, 7, 8, 1, 2, 3, 6, 9, 11))
    return x.reshape(b * num_kv * math.prod(x.shape[2:8]), math.prod(x.shape[8:11]), d)


def neighborhood_blocked(query, key, value, rpb, *, scale, spec: windows.NASpec, tile=None,
                         logit_budget: int = LOGIT_BUDGET):
    """Returns `(out [B, *spatial, N, Hv] in query dtype, lse [B, *spatial, N] fp32)`.

    `tile`: queries per tile along each axis (int or tuple; default `tiling.DEFAULT_TILE`), in group indices.
    """
    b, *spatial, n_heads, h = query.shape
    num_kv, hv = key.shape[-2], value.shape[-1]
    g = n_heads // num_kv
    plans, n_chunks, per_chunk = _plans(tuple(spatial), spec, tile, b * n_heads, logit_budget)
    p0, p1, p2 = plans
    lengths3 = tuple(spatial) + (1,) * (3 - len(spatial))
    n_tiles = p1.groups * p1.num_tiles * p2.groups * p2.num_tiles * p0.groups * per_chunk
    n_rows = p0.tile * p1.tile * p2.tile
    n_keys = p0.span * p1.span * p2.span

    # Queries: [n_chunks, b, k, c, u, e, w, a, t, g, x, y, z, h].
    q = _pad_axes(query.reshape(b, *lengths3, n_heads, h), [p.query_length for p in plans])
    q = q.reshape(b, n_chunks, per_chunk, p0.tile, p0.groups, p1.num_tiles, p1.tile, p1.groups,
                  p2.num_tiles, p2.tile, p2.groups, num_kv, g, h)
    q = jnp.transpose(q, (1, 0, 11, 7, 5, 10, 8, 4, 2, 12, 3, 6, 9, 13))
    key = _pad_axes(key.reshape(b, *lengths3, num_kv, h), [p.key_length for p in plans])
    value = _pad_axes(value.reshape(b, *lengths3, num_kv, hv), [p.key_length for p in plans])

    def per_chunk_tables(arr):  # [a, T, ...] -> [n_chunks, a, t, ...]
        arr = arr.reshape(arr.shape[0], n_chunks, per_chunk, *arr.shape[2:])
        return np.moveaxis(arr, 1, 0)

    xs = {"q": q, "index": per_chunk_tables(p0.key_index), "mask": per_chunk_tables(_additive_mask(p0))}
    masks = [jnp.asarray(_additive_mask(p)) for p in (p1, p2)]
    rpb5 = one_hots = None
    if rpb is not None:
        rpb5 = rpb.astype(jnp.float32).reshape(num_kv, g, *[2 * p.kernel - 1 for p in plans])
        xs["one_hot"] = per_chunk_tables(p0.one_hot_rel())
        one_hots = [jnp.asarray(p.one_hot_rel()) for p in (p1, p2)]

    def body(xs):
        kc, vc = _halos(key, xs["index"], plans), _halos(value, xs["index"], plans)
        qc = xs["q"].reshape(b * num_kv * n_tiles, g * n_rows, h)
        logits = jnp.einsum("bqh,bsh->bqs", qc, kc, preferred_element_type=jnp.float32) * scale
        logits = logits.reshape(b, num_kv, n_tiles, g, n_rows, n_keys)
        mask = sum(_place(m, dims[:4], TILE_DIMS + "xyzXYZ") for m, dims in zip([xs["mask"], *masks], ONE_HOT_DIMS))
        logits = logits + mask.reshape(n_tiles, 1, n_rows, n_keys)
        if rpb5 is not None:
            operands = ",".join(("kgPQR",) + ONE_HOT_DIMS)
            bias = jnp.einsum(f"{operands}->{BIAS_DIMS}", rpb5, xs["one_hot"], *one_hots)
            logits = logits + bias.reshape(num_kv, n_tiles, g, n_rows, n_keys)
        logits = logits.reshape(b * num_kv * n_tiles, g * n_rows, n_keys)
        m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))  # every row sees >= 1 key: finite
        p = jnp.exp(logits - m[..., None])
        l = jnp.sum(p, axis=-1)
        out = jnp.einsum("bqs,bsv->bqv", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
        return out / l[..., None], m + jnp.log(l)

    if n_chunks == 1:
        out, lse = jax.tree.map(lambda x: x[None], body(jax.tree.map(lambda x: x[0], xs)))
    else:
        out, lse = jax.lax.map(jax.checkpoint(body), xs)
    # [n, b, k, c, u, e, w, a, t, g, x, y, z, (v)] -> [b, (n t x a), (u y c), (w z e), (k g), (v)]
    dims = (n_chunks, b, num_kv, p1.groups, p1.num_tiles, p2.groups, p2.num_tiles, p0.groups, per_chunk, g,
            p0.tile, p1.tile, p2.tile)
    order = (1, 0, 8, 10, 7, 4, 11, 3, 6, 12, 5, 2, 9)
    padded = [p.query_length for p in plans]
    out = jnp.transpose(out.reshape(dims + (hv,)), order + (13,)).reshape(b, *padded, n_heads, hv)
    lse = jnp.transpose(lse.reshape(dims), order).reshape(b, *padded, n_heads)
    crop = (slice(None),) + tuple(slice(0, length) for length in lengths3)
    out = out[crop].reshape(b, *spatial, n_heads, hv).astype(query.dtype)
    return out, lse[crop].reshape(b, *spatial, n_heads)
