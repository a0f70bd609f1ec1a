"""Window index math of neighborhood attention along one spatial axis (NATTEN conventions, see ops.md).

The one implementation of the window rules, shared by the op (`jaxattn.neighborhood`: reference, blocked XLA
path), the fused kernels (`jaxattn.kernels.neighborhood_attention`) and context parallelism. Everything is
static (plain Python / numpy on shapes), so every path builds its index tables at trace time.

Along an axis of extent `L` with window `k`, dilation `d` and stride `s`:
- positions split into `d` dilation groups by `i % d`; query `i` sits at index `ii = i // d` of its group, whose
  length is `Lg` (it differs by at most one between groups when `d` does not divide `L`);
- stride groups are runs of `s` consecutive group indices (NATTEN >= 0.20 applies the stride inside each dilation
  group); every query of a run uses the window of its leader `min(first + s // 2, Lg - 1)`, or
  `min(first + s - 1, Lg - 1)` when causal, so a last, partial run is led by its last query;
- non-causal: `start = clamp(leader - k // 2, 0, Lg - k)`, keys `start .. start + k - 1` (shifted at the borders,
  never truncated; even `k` has `k/2` keys before the query and `k/2 - 1` after, NATTEN >= 0.17.5);
- causal: keys `max(leader - k + 1, 0) .. ii` (no shift; the end is the query itself, so a stride run never sees
  keys after its own query, as in NATTEN's GNA reference);
- relative position bias index of key `m` for query `ii`: `m - ii + k - 1` (NATTEN <= 0.17, odd `k` only).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class NASpec:
    """Static per-axis parameters (hashable: used as a static argument)."""
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    def axis(self, a: int) -> tuple[int, int, int, bool]:
        return self.kernel_size[a], self.dilation[a], self.stride[a], self.is_causal[a]


def group_length(length: int, dilation: int, group: int) -> int:
    """Number of positions `group, group + d, ...` below `length`."""
    return len(range(group, length, dilation))


def window_bounds(ii, group_len: int, kernel: int, stride: int, causal: bool):
    """The rules above: query `ii` of a group of `group_len` sees group indices `lo <= m < hi`.

    `ii`: an int or an int numpy array (`0 <= ii < group_len`); returns `(lo, hi)` of the same kind.
    """
    first = (ii // stride) * stride
    lead = np.minimum(first + (stride - 1 if causal else stride // 2), group_len - 1)
    if causal:
        return np.maximum(lead - kernel + 1, 0), ii + 1
    lo = np.clip(lead - kernel // 2, 0, group_len - kernel)
    return lo, lo + kernel


def neighbors(i: int, length: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False):
    """Keys of query `i` along one axis, one query at a time.

    Returns `(positions, rpb_indices)`: two lists of equal length (`kernel`, or fewer for early causal queries).
    """
    g, ii = i % dilation, i // dilation
    lo, hi = window_bounds(ii, group_length(length, dilation, g), kernel, stride, causal)
    members = range(int(lo), int(hi))
    return [g + m * dilation for m in members], [m - ii + kernel - 1 for m in members]


def group_windows(length: int, kernel: int, dilation: int, stride: int, causal: bool, num_queries: int):
    """Vectorised windows in group coordinates: `(lo, hi)`, int arrays `[dilation, num_queries]`.

    Query `ii` of group `g` sees group indices `lo[g, ii] <= m < hi[g, ii]`. Indices past the end of a group
    (padding, `ii >= Lg`) copy the window of the group's last query, so padded rows never see an empty window.
    """
    lo = np.zeros((dilation, num_queries), np.int64)
    hi = np.zeros((dilation, num_queries), np.int64)
    for g in range(dilation):
        lg = group_length(length, dilation, g)
        lo[g], hi[g] = window_bounds(np.minimum(np.arange(num_queries), lg - 1), lg, kernel, stride, causal)
    return lo, hi


def axis_tables(length: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False):
    """Per query of one axis: key positions, validity and rpb index, each `[length, kernel]` (padded with 0/False).

    Built from `neighbors`, one query at a time (the brute-force reference's view of the rules).
    """
    keys = np.zeros((length, kernel), np.int32)
    valid = np.zeros((length, kernel), bool)
    rel = np.zeros((length, kernel), np.int32)
    for i in range(length):
        pos, r = neighbors(i, length, kernel, dilation, stride, causal)
        keys[i, :len(pos)], valid[i, :len(pos)], rel[i, :len(r)] = pos, True, r
    return keys, valid, rel
