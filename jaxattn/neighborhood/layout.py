"""Static layout of the blocked XLA path: canonical 3-D axes, tile tables, chunks, and moving arrays in and out.

Every problem is handled as 3-D: missing axes become unit axes with kernel 1. Along each axis the tokens are viewed
in dilation-group coordinates and cut into query tiles (`jaxattn.neighborhood.tiling`); the first axis' tiles are
grouped into `n_chunks` chunks processed one after the other. Inside a chunk everything is laid out for one
batched matmul:

    queries `[B * K * tiles, G * rows, D]`, key halos `[B * K * tiles, keys, D]`

with tiles ordered `(c u e w a t)`, rows `(x y z)` and keys `(X Y Z)`, where per axis the letters are
dilation group / tile / query in tile / key in halo / rpb offset: axis 0 `a t x X P`, axis 1 `c u y Y Q`,
axis 2 `e w z Z R`. Masks and relative position biases are `[tiles, rows, keys]` tables broadcast over batch and
heads, expanded from per-axis tables (the bias through one-hot matmuls, so its gradient needs no scatter).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from jaxattn.core import blocking
from jaxattn.core import neighborhood_windows as windows
from jaxattn.neighborhood import tiling

TILE_DIMS = "cuewat"
AXIS_DIMS = ("atxX", "cuyY", "ewzZ")
ONE_HOT_DIMS = ("atxXP", "cuyYQ", "ewzZR")
BIAS_DIMS = "k" + TILE_DIMS + "gxyzXYZ"
# [b, n, t, x, a, u, y, c, w, z, e, k, g, D] <-> [n, b, k, c, u, e, w, a, t, g, x, y, z, D]
_TO_CHUNKS = (1, 0, 11, 7, 5, 10, 8, 4, 2, 12, 3, 6, 9, 13)
_FROM_CHUNKS = tuple(int(i) for i in np.argsort(_TO_CHUNKS))
# [b, a, t, X, c, u, Y, e, w, Z, k, D] <-> [b, k, c, u, e, w, a, t, X, Y, Z, D]
_TO_HALOS = (0, 10, 4, 5, 7, 8, 1, 2, 3, 6, 9, 11)
_FROM_HALOS = tuple(int(i) for i in np.argsort(_TO_HALOS))


def _place(x, src: str, dst: str):
    """Transposes `x` (dims named by `src`) into the order of `dst`, with size-1 axes for dims it lacks."""
    present = sorted(src, key=dst.index)
    x = jnp.transpose(x, [src.index(c) for c in present])
    return x.reshape([x.shape[present.index(c)] if c in src else 1 for c in dst])


@dataclasses.dataclass(frozen=True)
class Layout:
    """Hashable description of one problem's blocking (a static argument of the custom VJP)."""
    batch: int
    spatial: tuple[int, ...]
    num_kv: int
    groups: int  # query heads per kv head
    axes: tuple[tuple[int, int, int, int, bool], ...]  # 3 x (length, kernel, dilation, stride, causal)
    tiles: tuple[int, int, int]
    n_chunks: int
    per_chunk: int

    @staticmethod
    def make(query_shape, num_kv: int, spec: windows.NASpec, tile=None, logit_budget: int = 1 << 19) -> "Layout":
        b, *spatial, n_heads, _ = query_shape
        nd = len(spatial)
        axes = tuple((length, *spec.axis(a)) for a, length in enumerate(spatial)) + ((1, 1, 1, 1, False),) * (3 - nd)
        if tile is None or isinstance(tile, int):
            tile = (tile,) * nd
        tiles = tuple(t or tiling.default_tile(*axes[a][:4], nd, a) for a, t in enumerate(tile)) + (1,) * (3 - nd)
        plans = [tiling.axis_tiles(*axes[a], tiles[a]) for a in range(3)]
        row = b * n_heads * plans[0].groups * math.prod(p.groups * p.num_tiles for p in plans[1:])
        row *= math.prod(p.tile * p.span for p in plans)  # logits of one first-axis tile (all others included)
        per_chunk = max(1, min(plans[0].num_tiles, logit_budget // row))
        n_chunks = math.ceil(plans[0].num_tiles / per_chunk)
        per_chunk = math.ceil(plans[0].num_tiles / n_chunks)
        return Layout(b, tuple(spatial), num_kv, n_heads // num_kv, axes, tiles, n_chunks, per_chunk)

    @functools.cached_property
    def plans(self) -> tuple[tiling.AxisTiles, ...]:
        first = tiling.axis_tiles(*self.axes[0], self.tiles[0], self.n_chunks * self.per_chunk)
        return (first,) + tuple(tiling.axis_tiles(*self.axes[a], self.tiles[a]) for a in (1, 2))

    @property
    def n_tiles(self) -> int:  # per chunk
        p0, p1, p2 = self.plans
        return p0.groups * self.per_chunk * p1.groups * p1.num_tiles * p2.groups * p2.num_tiles

    @property
    def n_rows(self) -> int:
        return math.prod(p.tile for p in self.plans)

    @property
    def n_keys(self) -> int:
        return math.prod(p.span for p in self.plans)

    @property
    def rows(self) -> int:  # matmul batch of one chunk
        return self.batch * self.num_kv * self.n_tiles

    # --------------------------------------------------------------------------- arrays in and out of chunks
    def queries_in(self, x):
        """`[B, *spatial, N, D]` -> `[n_chunks, rows, G * n_rows, D]` (padded queries are zeros)."""
        p0, p1, p2 = self.plans
        x = x.reshape(self.batch, *[a[0] for a in self.axes], *x.shape[-2:])
        for axis, p in enumerate(self.plans, start=1):
            x = blocking.pad_axis(x, axis, p.query_length)
        x = x.reshape(self.batch, self.n_chunks, self.per_chunk, p0.tile, p0.groups, p1.num_tiles, p1.tile,
                      p1.groups, p2.num_tiles, p2.tile, p2.groups, self.num_kv, self.groups, x.shape[-1])
        x = jnp.transpose(x, _TO_CHUNKS)
        return x.reshape(self.n_chunks, self.rows, self.groups * self.n_rows, x.shape[-1])

    def queries_out(self, x):
        """Inverse of `queries_in` (drops the padding)."""
        p0, p1, p2 = self.plans
        x = x.reshape(self.n_chunks, self.batch, self.num_kv, p1.groups, p1.num_tiles, p2.groups, p2.num_tiles,
                      p0.groups, self.per_chunk, self.groups, p0.tile, p1.tile, p2.tile, x.shape[-1])
        x = jnp.transpose(x, _FROM_CHUNKS)
        x = x.reshape(self.batch, *[p.query_length for p in self.plans], self.num_kv * self.groups, x.shape[-1])
        x = x[(slice(None),) + tuple(slice(0, a[0]) for a in self.axes)]
        return x.reshape(self.batch, *self.spatial, *x.shape[-2:])

    def keys_in(self, x):
        """`[B, *spatial, K, D]` -> `[B, Lk1, Lk2, Lk3, K, D]` padded to whole dilation groups."""
        x = x.reshape(self.batch, *[a[0] for a in self.axes], *x.shape[-2:])
        for axis, p in enumerate(self.plans, start=1):
            x = blocking.pad_axis(x, axis, p.key_length)
        return x

    def keys_out(self, x):
        x = x[(slice(None),) + tuple(slice(0, a[0]) for a in self.axes)]
        return x.reshape(self.batch, *self.spatial, *x.shape[-2:])

    def halos(self, x, index0):
        """Padded keys -> one chunk's halos `[rows, n_keys, D]`; `index0` `[a, t, X]` is the chunk's first-axis
        halo table."""
        _, p1, p2 = self.plans
        for axis, index in ((1, index0), (2, p1.key_index), (3, p2.key_index)):
            x = jnp.take(x, index.reshape(-1), axis=axis, mode="clip")
        x = x.reshape((self.batch,) + index0.shape + p1.key_index.shape + p2.key_index.shape + x.shape[-2:])
        return jnp.transpose(x, _TO_HALOS).reshape(self.rows, self.n_keys, x.shape[-1])

    def add_halos(self, acc, x, index0):
        """Adjoint of `halos`: scatter-adds halo rows `[rows, n_keys, D]` into padded keys `acc`."""
        _, p1, p2 = self.plans
        shape = (self.batch, self.num_kv, p1.groups, p1.num_tiles, p2.groups, p2.num_tiles) + index0.shape[:2]
        x = x.reshape(shape + (index0.shape[2], p1.span, p2.span, x.shape[-1]))
        x = jnp.transpose(x, _FROM_HALOS)
        x = x.reshape(self.batch, index0.size, p1.key_index.size, p2.key_index.size, self.num_kv, x.shape[-1])
        i0 = index0.reshape(-1, 1, 1)
        i1 = p1.key_index.reshape(1, -1, 1)
        i2 = p2.key_index.reshape(1, 1, -1)
        return acc.at[:, i0, i1, i2].add(x, mode="promise_in_bounds")

    # --------------------------------------------------------------------------------------- index tables
    def chunk_tables(self, with_rpb: bool) -> dict:
        """Per-chunk numpy tables of the first axis, stacked on a leading `n_chunks` axis (scan inputs)."""
        p0 = self.plans[0]

        def split(arr):  # [a, T, ...] -> [n_chunks, a, t, ...]
            arr = arr.reshape(arr.shape[0], self.n_chunks, self.per_chunk, *arr.shape[2:])
            return np.moveaxis(arr, 1, 0)

        tables = {"index": split(p0.key_index), "mask": split(_additive(p0))}
        if with_rpb:
            tables["one_hot"] = split(p0.one_hot_rel())
        return tables

    def mask(self, mask0):
        """Additive window mask `[tiles, 1, n_rows, n_keys]` (0 or -inf) from the chunk's first-axis table."""
        masks = [mask0] + [jnp.asarray(_additive(p)) for p in self.plans[1:]]
        total = sum(_place(m, dims, TILE_DIMS + "xyzXYZ") for m, dims in zip(masks, AXIS_DIMS))
        return total.reshape(self.n_tiles, 1, self.n_rows, self.n_keys)

    def _one_hots(self, one_hot0):
        return [one_hot0] + [jnp.asarray(p.one_hot_rel()) for p in self.plans[1:]]

    def bias(self, rpb5, one_hot0):
        """Relative position bias `[K, tiles, G, n_rows, n_keys]` from `rpb5` `[K, G, P, Q, R]` (fp32)."""
        operands = ",".join(("kgPQR",) + ONE_HOT_DIMS)
        bias = jnp.einsum(f"{operands}->{BIAS_DIMS}", rpb5, *self._one_hots(one_hot0))
        return bias.reshape(self.num_kv, self.n_tiles, self.groups, self.n_rows, self.n_keys)

    def bias_grad(self, d_bias, one_hot0):
        """Adjoint of `bias`: `[K, tiles, G, n_rows, n_keys]` -> `[K, G, P, Q, R]`."""
        p0, p1, p2 = self.plans
        shape = (self.num_kv, p1.groups, p1.num_tiles, p2.groups, p2.num_tiles, p0.groups, self.per_chunk,
                 self.groups, p0.tile, p1.tile, p2.tile, p0.span, p1.span, p2.span)
        operands = ",".join((BIAS_DIMS,) + ONE_HOT_DIMS)
        return jnp.einsum(f"{operands}->kgPQR", d_bias.reshape(shape), *self._one_hots(one_hot0))


def _additive(plan: tiling.AxisTiles):
    return np.where(plan.mask, np.float32(0), np.float32(-np.inf))
