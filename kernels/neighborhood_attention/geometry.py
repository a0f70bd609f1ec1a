"""Static geometry of the neighborhood-attention kernels: dilation groups, query tiles and key boxes, window
tables, and the walks between them.

Every spatial axis `a` is viewed in dilation-group coordinates (`jaxattn.core.neighborhood_windows`): position
`p = ii * d + g`. The wrapper moves the `d1 * .. * dn` dilation groups into the batch, so each kernel program sees
a dense, dilation-1 problem on the group grid `Lg1 x .. x Lgn`. Queries and keys are cut independently: query
tiles of `tq1 x .. x tqn` and key boxes of `tk1 x .. x tkn` group indices, each side padded to whole tiles and
flattened tile-major (`[n1, .., nn, t1, .., tn]`), so one tile is one contiguous block of rows.

Windows are separable (a product of per-axis intervals) and, along each axis, their start and end never decrease
with the query. So the keys of a query tile lie in a box of key boxes: per axis, from the box holding the tile's
first window start to the box holding its last window end. `AxisWalk` lists that range for every query tile (the
forward and dq walk) and its exact transpose, the query tiles whose range holds each key box (the dk/dv walk):
per tile, so border tiles (where windows shift inward), causal and strided windows and dilation groups of unequal
length cost only what their own windows touch. Padded queries (past a group's end) copy the window of the
group's last query (`group_windows`), so they never widen a range, every row sees at least one key, and with a
zero cotangent they add nothing to any gradient. Padded keys are in no window.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.core import blocking
from jaxattn.core import neighborhood_windows as windows


def _static(*xs) -> bool:
    return all(isinstance(x, (int, np.integer)) for x in xs)


def _div(a, b: int):
    return a // b if _static(a) else lax.div(a, b)


def _rem(a, b: int):
    return a % b if _static(a) else lax.rem(a, b)


def _minimum(a, b):
    return min(a, b) if _static(a, b) else jnp.minimum(a, b)


def _maximum(a, b):
    return max(a, b) if _static(a, b) else jnp.maximum(a, b)


def unflatten(i, radices):
    """Mixed-radix digits of `i` (most significant first); radices may be traced (dynamic loop bounds)."""
    digits = []
    for r in reversed(radices):
        digits.append(_rem(i, r))
        i = _div(i, r)
    return digits[::-1]


def flatten(digits, radices):
    i = 0
    for d, r in zip(digits, radices):
        i = i * r + d
    return i


@dataclasses.dataclass(frozen=True, eq=False)
class AxisWalk:
    """One axis, per dilation group `g` (rows of every table): query windows and the walks of whole tiles.

    lo, hi: `[d, nq * tq]` window of each (padded) query, group indices `lo <= m < hi`.
    key_first, key_count: `[d, nq]` the key boxes `key_first .. key_first + key_count - 1` of each query tile.
    query_first, query_count: `[d, nk]` the query tiles whose key range holds each key box (0 for padding).
    """
    lo: np.ndarray
    hi: np.ndarray
    key_first: np.ndarray
    key_count: np.ndarray
    query_first: np.ndarray
    query_count: np.ndarray


@functools.lru_cache(maxsize=512)
def axis_walk(length: int, kernel: int, dilation: int, stride: int, causal: bool, query_tile: int,
              key_tile: int) -> AxisWalk:
    lg = -(-length // dilation)
    nq, nk = -(-lg // query_tile), -(-lg // key_tile)
    lo, hi = windows.group_windows(length, kernel, dilation, stride, causal, nq * query_tile)
    first = lo.reshape(dilation, nq, query_tile).min(-1) // key_tile
    stop = -(-hi.reshape(dilation, nq, query_tile).max(-1) // key_tile)
    # Tile c visits box j iff first[c] <= j < stop[c]; both bounds never decrease with c, so the tiles visiting j
    # are the run from the first tile with stop > j to the last with first <= j.
    boxes = np.arange(nk)
    q_first = np.stack([np.searchsorted(stop[g], boxes, side="right") for g in range(dilation)])
    q_stop = np.stack([np.searchsorted(first[g], boxes, side="right") for g in range(dilation)])
    out = AxisWalk(lo.astype(np.int32), hi.astype(np.int32), first.astype(np.int32),
                   (stop - first).astype(np.int32), q_first.astype(np.int32),
                   np.maximum(q_stop - q_first, 0).astype(np.int32))
    for x in dataclasses.astuple(out):
        x.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True)
class Walk:
    """The boxes of one side visited by each tile of the other side, read from a flat int32 table.

    The table holds, per axis, `first` then `count` entries `[d_a, tiles_a]` (at `starts[a]`, `count` right after);
    it is the scalar-prefetch operand on TPU ('grid': index maps read it), an input of the kernel in 'fori' mode,
    and a list of ints in tests. `ranges(table, b, tile)` gives per axis `(first, count)` for the kernel's batch
    index `b` (dilation groups lead it) and flat tile index; 'fori' walks `count(ranges)` steps with dynamic
    radices, 'grid' walks the static `steps` and skips steps whose digits fall outside a range (their block index
    repeats the last one: no new copy).
    """
    tiles: tuple[int, ...]  # tile grid of the walking side
    boxes: tuple[int, ...]  # box grid of the visited side
    dilation: tuple[int, ...]
    batch: int
    spans: tuple[int, ...]  # per axis, the largest count (the extent of the 'grid' walk)
    starts: tuple[int, ...]

    @property
    def steps(self) -> int:
        return math.prod(self.spans)

    def ranges(self, table, b, tile):
        groups = unflatten(_div(b, self.batch), self.dilation)
        out = []
        for a, (g, c) in enumerate(zip(groups, unflatten(tile, self.tiles))):
            at = self.starts[a] + g * self.tiles[a] + c
            out.append((table[at], table[at + self.dilation[a] * self.tiles[a]]))
        return out

    @staticmethod
    def count(ranges):
        total = 1
        for _, count in ranges:
            total = total * count
        return total

    def fori_box(self, ranges, r):
        """Flat box index of step `r` of the dynamic walk."""
        digits = unflatten(r, [_maximum(count, 1) for _, count in ranges])
        return flatten([first + j for (first, _), j in zip(ranges, digits)], self.boxes)

    def grid_box(self, ranges, r):
        digits = unflatten(r, self.spans)
        return flatten([_maximum(_minimum(first + _minimum(j, count - 1), n - 1), 0)
                        for (first, count), j, n in zip(ranges, digits, self.boxes)], self.boxes)

    def grid_valid(self, ranges, r):
        ok = True
        for (_, count), j in zip(ranges, unflatten(r, self.spans)):
            ok = ok & (j < count)
        return ok


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Hashable description of one call (a static argument of the custom VJP)."""
    batch: int
    spatial: tuple[int, ...]
    heads: int
    kv_heads: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]
    query_tiles: tuple[int, ...]  # query tile extent per axis, in group indices
    key_tiles: tuple[int, ...]  # key box extent per axis

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def group_len(self) -> tuple[int, ...]:
        return tuple(-(-n // d) for n, d in zip(self.spatial, self.dilation))

    @property
    def query_grid(self) -> tuple[int, ...]:
        """Query tiles per axis."""
        return tuple(-(-lg // t) for lg, t in zip(self.group_len, self.query_tiles))

    @property
    def key_grid(self) -> tuple[int, ...]:
        """Key boxes per axis."""
        return tuple(-(-lg // t) for lg, t in zip(self.group_len, self.key_tiles))

    @property
    def block_q(self) -> int:
        return math.prod(self.query_tiles)

    @property
    def block_k(self) -> int:
        return math.prod(self.key_tiles)

    @property
    def num_query_tiles(self) -> int:
        return math.prod(self.query_grid)

    @property
    def num_key_boxes(self) -> int:
        return math.prod(self.key_grid)

    @property
    def seq_q(self) -> int:
        return self.block_q * self.num_query_tiles

    @property
    def seq_k(self) -> int:
        return self.block_k * self.num_key_boxes

    @property
    def groups(self) -> int:
        """Dilation groups (all axes), folded into the kernels' batch."""
        return math.prod(self.dilation)

    @property
    def gqa(self) -> int:
        return self.heads // self.kv_heads

    @property
    def rpb_size(self) -> int:
        return math.prod(2 * k - 1 for k in self.kernel)

    def axis(self, a: int) -> AxisWalk:
        return axis_walk(self.spatial[a], self.kernel[a], self.dilation[a], self.stride[a], self.causal[a],
                         self.query_tiles[a], self.key_tiles[a])

    # ------------------------------------------------------------------------------------------------ walks
    @functools.cached_property
    def _walk_tables(self):
        keys, queries, k_start, q_start, k_spans, q_spans = [], [], [], [], [], []
        for a in range(self.ndim):
            ax = self.axis(a)
            k_start.append(sum(x.size for x in keys))
            keys += [ax.key_first, ax.key_count]
            k_spans.append(max(1, int(ax.key_count.max())))
            q_start.append(sum(x.size for x in queries))
            queries += [ax.query_first, ax.query_count]
            q_spans.append(max(1, int(ax.query_count.max())))
        key_walk = Walk(self.query_grid, self.key_grid, self.dilation, self.batch, tuple(k_spans), tuple(k_start))
        query_walk = Walk(self.key_grid, self.query_grid, self.dilation, self.batch, tuple(q_spans),
                          tuple(q_start))
        return ((key_walk, np.concatenate([x.ravel() for x in keys])),
                (query_walk, np.concatenate([x.ravel() for x in queries])))

    def keys_of_queries(self) -> tuple[Walk, np.ndarray]:
        """The forward / dq walk (query tile -> its key boxes) and its int32 table."""
        return self._walk_tables[0]

    def queries_of_keys(self) -> tuple[Walk, np.ndarray]:
        """The dk/dv walk (key box -> the query tiles that visit it) and its int32 table."""
        return self._walk_tables[1]

    @functools.cached_property
    def visited_pairs(self) -> int:
        """(query tile, key box) pairs both walks visit, summed over dilation groups (per batch row and head)."""
        per_axis = [self.axis(a).key_count.sum(axis=1) for a in range(self.ndim)]  # [d_a]: pairs per group
        total = per_axis[0]
        for counts in per_axis[1:]:
            total = np.multiply.outer(total, counts)
        return int(np.sum(total))

    @property
    def computed_logits(self) -> int:
        """Logits the kernels compute per batch row and head (every visited pair is a `block_q x block_k` tile)."""
        return self.visited_pairs * self.block_q * self.block_k

    @functools.cached_property
    def needed_logits(self) -> int:
        """Logits the windows hold: the sum of every real query's window size (per batch row and head)."""
        total = 1
        for a in range(self.ndim):
            ax = self.axis(a)
            total *= sum(int((ax.hi[g] - ax.lo[g])[:windows.group_length(self.spatial[a], self.dilation[a], g)]
                             .sum()) for g in range(self.dilation[a]))
        return total

    # ------------------------------------------------------------------------------- relative position bias
    @functools.cached_property
    def offset_bounds(self) -> tuple[tuple[int, int, int], ...]:
        """Per axis `(least, greatest, step)` of `key box origin - query tile origin` (group indices) over the
        visited pairs: the bias of a tile is a function of that offset alone."""
        out = []
        for a, (tq, tk) in enumerate(zip(self.query_tiles, self.key_tiles)):
            ax = self.axis(a)
            c = np.arange(ax.key_first.shape[1])
            least = ax.key_first * tk - c * tq
            greatest = (ax.key_first + np.maximum(ax.key_count, 1) - 1) * tk - c * tq
            out.append((int(least.min()), int(greatest.max()), math.gcd(tq, tk)))
        return tuple(out)

    @property
    def offset_spans(self) -> tuple[int, ...]:
        return tuple((hi - lo) // step + 1 for lo, hi, step in self.offset_bounds)

    @property
    def num_offsets(self) -> int:
        return math.prod(self.offset_spans)

    def offset_index(self, query_tile, key_box):
        """Which bias tile a (query tile, key box) pair uses (ints or traced scalars)."""
        qc, kc = unflatten(query_tile, self.query_grid), unflatten(key_box, self.key_grid)
        return flatten([_div(k * tk - q * tq - lo, step) for q, k, tq, tk, (lo, _, step)
                        in zip(qc, kc, self.query_tiles, self.key_tiles, self.offset_bounds)], self.offset_spans)

    @functools.cached_property
    def bias_index(self) -> np.ndarray:
        """int32 `[offsets, block_q, block_k]`: index into the flattened bias table of each (query, key) of a tile
        pair at each offset; `rpb_size` (a zero pad entry) where the relative position is out of the table's range.

        The kernels read these few precomputed tiles instead of expanding the table per tile (Mosaic has no
        vector gather)."""
        nd = self.ndim
        flat, valid = 0, True
        for a, ((lo, hi, step), tq, tk, k) in enumerate(zip(self.offset_bounds, self.query_tiles, self.key_tiles,
                                                             self.kernel)):
            o = np.arange(lo, hi + 1, step).reshape([-1 if i == a else 1 for i in range(3 * nd)])
            x = np.arange(tq).reshape([-1 if i == nd + a else 1 for i in range(3 * nd)])
            y = np.arange(tk).reshape([-1 if i == 2 * nd + a else 1 for i in range(3 * nd)])
            rel = o + y - x + k - 1
            valid = valid & (rel >= 0) & (rel <= 2 * k - 2)
            flat = flat * (2 * k - 1) + rel
        index = np.where(valid, flat, self.rpb_size).astype(np.int32)
        return np.ascontiguousarray(index.reshape(self.num_offsets, self.block_q, self.block_k))

    # ------------------------------------------------------------------------------------------ tables (numpy)
    def _tile_major(self, per_axis, tiles, grid):
        """Per axis `x [d_a or 1, grid_a * tiles_a]` broadcast over the other axes and flattened tile-major:
        `[groups or 1, prod(grid) * prod(tiles)]`."""
        nd = self.ndim
        lead = [x.shape[0] for x in per_axis]
        out = []
        for a, x in enumerate(per_axis):
            shape = [1] * (3 * nd)
            shape[a], shape[nd + a], shape[2 * nd + a] = lead[a], grid[a], tiles[a]
            x = np.broadcast_to(x.reshape(shape), lead + list(grid) + list(tiles))
            out.append(np.ascontiguousarray(x.reshape(math.prod(lead), -1)))
        return out

    @functools.cached_property
    def query_tables(self) -> tuple[np.ndarray, ...]:
        """`lo_1, hi_1, .., lo_n, hi_n`, each int32 `[groups, seq_q, 1]` in tile-major query order."""
        out = []
        for bound in (0, 1):
            out.append(self._tile_major([(self.axis(a).lo, self.axis(a).hi)[bound] for a in range(self.ndim)],
                                        self.query_tiles, self.query_grid))
        return tuple(x[..., None] for pair in zip(*out) for x in pair)

    @functools.cached_property
    def query_positions(self) -> tuple[np.ndarray, ...]:
        """Group index of each query per axis, int32 `[seq_q, 1]` in tile-major order."""
        ii = [np.arange(n * t, dtype=np.int32)[None] for n, t in zip(self.query_grid, self.query_tiles)]
        return tuple(x.reshape(-1, 1) for x in self._tile_major(ii, self.query_tiles, self.query_grid))

    @functools.cached_property
    def key_positions(self) -> tuple[np.ndarray, ...]:
        """Group index of each key per axis, int32 `[key boxes, 1, block_k]` (one row per box)."""
        m = [np.arange(n * t, dtype=np.int32)[None] for n, t in zip(self.key_grid, self.key_tiles)]
        return tuple(x.reshape(self.num_key_boxes, 1, self.block_k)
                     for x in self._tile_major(m, self.key_tiles, self.key_grid))

    # ------------------------------------------------------------------------------------------ layouts (XLA)
    def _tiling(self, side: str):
        return (self.query_tiles, self.query_grid) if side == "query" else (self.key_tiles, self.key_grid)

    def to_kernel(self, x, dim: int, side: str):
        """`[B, *spatial, heads, D]` -> `[groups * B, heads, seq, dim]` in the tile-major order of `side`
        ('query' or 'key'), zero padded; dilation groups lead the batch."""
        nd = self.ndim
        tiles, grid = self._tiling(side)
        for a in range(nd):
            x = blocking.pad_axis(x, 1 + a, self.dilation[a] * grid[a] * tiles[a])
        shape = [self.batch]
        for a in range(nd):
            shape += [grid[a], tiles[a], self.dilation[a]]
        x = x.reshape(shape + list(x.shape[-2:]))
        perm = [3 + 3 * a for a in range(nd)] + [0, 1 + 3 * nd] + [1 + 3 * a for a in range(nd)]
        perm += [2 + 3 * a for a in range(nd)] + [2 + 3 * nd]
        x = jnp.transpose(x, perm)
        x = x.reshape(self.groups * self.batch, x.shape[nd + 1], math.prod(grid) * math.prod(tiles), x.shape[-1])
        return blocking.pad_axis(x, 3, dim)

    def from_kernel(self, x, dim: int, side: str):
        """Inverse of `to_kernel` (drops padded tokens and features): `[B, *spatial, heads, dim]`."""
        nd = self.ndim
        tiles, grid = self._tiling(side)
        heads = x.shape[1]
        x = x.reshape(list(self.dilation) + [self.batch, heads] + list(grid) + list(tiles) + [x.shape[-1]])
        perm = [nd]
        for a in range(nd):
            perm += [nd + 2 + a, 2 * nd + 2 + a, a]
        perm += [nd + 1, 3 * nd + 2]
        x = jnp.transpose(x, perm)
        x = x.reshape([self.batch] + [d * n * t for d, n, t in zip(self.dilation, grid, tiles)]
                      + [heads, x.shape[-1]])
        return x[(slice(None),) + tuple(slice(0, n) for n in self.spatial) + (slice(None), slice(0, dim))]
