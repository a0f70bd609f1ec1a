"""Query tiles and their key halos along one axis, for the blocked XLA path (static numpy tables).

The axis is viewed in dilation-group coordinates: position `p = ii * d + g`. Queries of each group are cut into
tiles of `tile` consecutive group indices; a tile's windows all fall inside one contiguous run of `span` group
indices (its halo, at most `tile + (k - 1)` long, and never longer than the group), which is what gets gathered
for it. Keys are therefore copied about `span / tile` times, never once per query.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jaxattn.core import neighborhood_windows as windows

# Queries per tile along each axis, by number of spatial axes: small enough that the halo overhead
# `prod((tile + k - 1) / tile)` stays modest, big enough for useful matmuls; the last (contiguous) axis gets the
# longest tiles. Tuned on CPU with k = 5..7 (benchmarks/neighborhood.py).
DEFAULT_TILE = {1: (32,), 2: (4, 8), 3: (2, 2, 4)}


@dataclasses.dataclass(frozen=True, eq=False)
class AxisTiles:
    """Tables for one axis. `d` dilation groups, `num_tiles` tiles of `tile` queries, halos of `span` keys.

    key_index: `[d, num_tiles, span]` positions in the key axis (padded to `key_length`) of each halo.
    mask: `[d, num_tiles, tile, span]` True where the halo key is in the query's window.
    rel: `[d, num_tiles, tile, span]` relative position bias index (`m - ii + k - 1`), -1 where masked.
    """
    length: int
    kernel: int
    groups: int
    tile: int
    num_tiles: int
    span: int
    key_length: int
    key_index: np.ndarray
    mask: np.ndarray
    rel: np.ndarray

    @property
    def query_length(self) -> int:
        """Length of the query axis once padded to whole tiles in every dilation group."""
        return self.num_tiles * self.tile * self.groups

    def one_hot_rel(self) -> np.ndarray:
        """`[d, num_tiles, tile, span, 2k - 1]` float32 one-hot of `rel` (all zero where masked)."""
        return (self.rel[..., None] == np.arange(2 * self.kernel - 1)).astype(np.float32)


def default_tile(length: int, kernel: int, dilation: int, stride: int, ndim: int, axis: int) -> int:
    """Tile size for one axis: the per-ndim default, a multiple of the stride, at most the group length."""
    group_len = math.ceil(length / dilation)
    tile = DEFAULT_TILE[ndim][axis]
    tile = max(stride, tile // stride * stride)
    return max(1, min(tile, group_len))


@functools.lru_cache(maxsize=256)
def axis_tiles(length: int, kernel: int, dilation: int, stride: int, causal: bool, tile: int,
               num_tiles: int | None = None) -> AxisTiles:
    """Builds the tables; `num_tiles` may exceed what the axis needs (extra tiles are padding)."""
    d = dilation
    group_len = math.ceil(length / d)  # the longest group; shorter ones are padded
    if num_tiles is None:
        num_tiles = math.ceil(group_len / tile)
    lo, hi = windows.group_windows(length, kernel, d, stride, causal, num_tiles * tile)
    lo_t = lo.reshape(d, num_tiles, tile).min(-1)
    hi_t = hi.reshape(d, num_tiles, tile).max(-1)
    span = int((hi_t - lo_t).max())
    assert span <= group_len, (span, group_len)
    start = np.minimum(lo_t, group_len - span)  # keep every halo inside the padded group
    m = start[..., None] + np.arange(span)  # [d, T, span] group index of each halo key
    key_index = m * d + np.arange(d)[:, None, None]
    lo4 = lo.reshape(d, num_tiles, tile, 1)
    hi4 = hi.reshape(d, num_tiles, tile, 1)
    mq = m[:, :, None, :]
    mask = (mq >= lo4) & (mq < hi4)
    # Padded queries (past a group's end) copied the window of the group's last query; their bias index is
    # taken from that query too, so it stays in range (their rows are dropped anyway).
    last = np.array([windows.group_length(length, d, g) - 1 for g in range(d)])
    ii = np.minimum(np.arange(num_tiles * tile)[None], last[:, None]).reshape(d, num_tiles, tile, 1)
    rel = np.where(mask, mq - ii + kernel - 1, -1).astype(np.int32)
    assert rel.max() <= 2 * kernel - 2 and (rel[mask] >= 0).all()
    key_index = key_index.astype(np.int32)
    for arr in (key_index, mask, rel):
        arr.setflags(write=False)
    return AxisTiles(length, kernel, d, tile, num_tiles, span, group_len * d, key_index, mask, rel)
