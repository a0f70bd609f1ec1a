"""Static geometry of the neighborhood-attention kernels: dilation groups, query/key boxes, window tables, bands.

Every spatial axis `a` is viewed in dilation-group coordinates (`jaxattn.core.neighborhood_windows`): position
`p = ii * d + g`. The wrapper moves the `d1 * .. * dn` dilation groups into the batch, so each kernel program sees a
dense, dilation-1 problem on the group grid `Lg1 x .. x Lgn` (padded to whole boxes). That grid is cut into boxes
of `t1 x .. x tn` tokens, flattened box-major (`[nb1, .., nbn, t1, .., tn]`), so one box is one contiguous block of
`prod(t)` rows: query tiles and key blocks are both boxes.

The exact windows come as int32 tables built from `windows.group_windows` (the op's rules, stride and causal
included): per query and axis `lo <= m < hi` in group indices, per key its group index `m`. A query box's halo is
the band `[box_start + lower, box_end + upper]` per axis (`lower`/`upper`: the extreme offsets `lo - ii`,
`hi - 1 - ii` over all real queries), rounded out to whole key boxes by `kernels/common/bands`; the backward's
key-major walk uses the transposed band. Padded queries (past a group's end) see only themselves (a zero key), so
they never widen the band and, with a zero cotangent, contribute nothing to any gradient.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.core import blocking
from jaxattn.kernels.common import bands
from jaxattn.core import neighborhood_windows as windows


@functools.lru_cache(maxsize=256)
def axis_windows(length: int, kernel: int, dilation: int, stride: int, causal: bool, padded: int):
    """`(lo, hi, lower, upper)` of one axis: int32 `[d, padded]` window bounds in group indices, and the band."""
    lo, hi = windows.group_windows(length, kernel, dilation, stride, causal, padded)
    lg = np.array([windows.group_length(length, dilation, g) for g in range(dilation)])[:, None]
    ii = np.arange(padded)[None]
    real = ii < lg
    lo, hi = np.where(real, lo, ii), np.where(real, hi, ii + 1)
    lower, upper = int((lo - ii)[real].min()), int((hi - 1 - ii)[real].max())
    return lo.astype(np.int32), hi.astype(np.int32), lower, upper


def _div(a, b: int):
    return a // b if isinstance(a, int) else lax.div(a, b)


def _rem(a, b: int):
    return a % b if isinstance(a, int) else lax.rem(a, b)


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
    tiles: tuple[int, ...]  # box extent per axis, in group indices

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def group_len(self) -> tuple[int, ...]:
        return tuple(-(-n // d) for n, d in zip(self.spatial, self.dilation))

    @property
    def boxes(self) -> tuple[int, ...]:
        return tuple(-(-lg // t) for lg, t in zip(self.group_len, self.tiles))

    @property
    def block(self) -> int:
        """Rows of one box (query tile = key block)."""
        return math.prod(self.tiles)

    @property
    def num_boxes(self) -> int:
        return math.prod(self.boxes)

    @property
    def seq(self) -> int:
        return self.block * self.num_boxes

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

    def axis(self, a: int):
        return axis_windows(self.spatial[a], self.kernel[a], self.dilation[a], self.stride[a], self.causal[a],
                            self.boxes[a] * self.tiles[a])

    @functools.cached_property
    def band(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.axis(a)[2:] for a in range(self.ndim))

    # ------------------------------------------------------------------------------- relative position bias
    @functools.cached_property
    def offset_bounds(self) -> tuple[tuple[int, int], ...]:
        """Per axis, the least and greatest `key box - query box` of any visited pair (both walks visit the
        same pairs: the band and its transpose select the same box pairs)."""
        out = []
        for t, n, (lo, hi) in zip(self.tiles, self.boxes, self.band):
            ranges = [bands.block_range(c * t, t, lo, hi, t, n) for c in range(n)]
            out.append((min(f - c for c, (f, _) in enumerate(ranges)),
                        max(s - 1 - c for c, (_, s) in enumerate(ranges))))
        return tuple(out)

    @property
    def offset_spans(self) -> tuple[int, ...]:
        return tuple(hi - lo + 1 for lo, hi in self.offset_bounds)

    @property
    def num_offsets(self) -> int:
        return math.prod(self.offset_spans)

    def offset_index(self, query_box, key_box):
        """Which bias tile a (query box, key box) pair uses (ints or traced scalars)."""
        qc, kc = unflatten(query_box, self.boxes), unflatten(key_box, self.boxes)
        return flatten([k - q - lo for q, k, (lo, _) in zip(qc, kc, self.offset_bounds)], self.offset_spans)

    @functools.cached_property
    def bias_index(self) -> np.ndarray:
        """int32 `[offsets, block, block]`: index into the flattened bias table of each (query, key) of a box pair
        at each offset; `rpb_size` (a zero pad entry) where the relative position is out of the table's range.

        The bias of a tile depends only on the box offset, since it is a function of `m - ii` alone: the kernels
        read these few precomputed tiles instead of expanding the table per tile."""
        nd = self.ndim
        flat, valid = 0, True
        for a, ((lo, hi), t, k) in enumerate(zip(self.offset_bounds, self.tiles, self.kernel)):
            o = np.arange(lo, hi + 1).reshape([-1 if i == a else 1 for i in range(3 * nd)])
            x = np.arange(t).reshape([-1 if i == nd + a else 1 for i in range(3 * nd)])
            y = np.arange(t).reshape([-1 if i == 2 * nd + a else 1 for i in range(3 * nd)])
            rel = o * t + y - x + k - 1
            valid = valid & (rel >= 0) & (rel <= 2 * k - 2)
            flat = flat * (2 * k - 1) + rel
        index = np.where(valid, flat, self.rpb_size).astype(np.int32)
        return np.ascontiguousarray(index.reshape(self.num_offsets, self.block, self.block))

    # ------------------------------------------------------------------------------------------ tables (numpy)
    def _place(self, x, dims):
        """`x` whose axes are the named dims (`g<a>`, `n<a>`, `t<a>`) broadcast to `[groups..., n..., t...]`."""
        order = ([f"g{a}" for a in range(self.ndim)] + [f"n{a}" for a in range(self.ndim)]
                 + [f"t{a}" for a in range(self.ndim)])
        sizes = dict(zip(order, list(self.dilation) + list(self.boxes) + list(self.tiles)))
        x = x.reshape([sizes[d] if d in dims else 1 for d in order])
        return np.broadcast_to(x, [sizes[d] for d in order])

    @functools.cached_property
    def query_tables(self) -> tuple[np.ndarray, ...]:
        """`lo_1, hi_1, .., lo_n, hi_n`, each int32 `[groups, seq, 1]` in box-major query order."""
        out = []
        for a in range(self.ndim):
            lo, hi = self.axis(a)[:2]
            for x in (lo, hi):
                x = x.reshape(self.dilation[a], self.boxes[a], self.tiles[a])
                out.append(self._place(x, (f"g{a}", f"n{a}", f"t{a}")).reshape(self.groups, self.seq, 1))
        return tuple(np.ascontiguousarray(x) for x in out)

    @functools.cached_property
    def positions(self) -> tuple[np.ndarray, ...]:
        """Group index of each token per axis, int32 `[1, seq]` in box-major order (keys and queries alike)."""
        out = []
        for a in range(self.ndim):
            m = np.arange(self.boxes[a] * self.tiles[a], dtype=np.int32).reshape(self.boxes[a], self.tiles[a])
            out.append(np.ascontiguousarray(self._place(m, (f"n{a}", f"t{a}"))[(0,) * self.ndim].reshape(1, -1)))
        return tuple(out)

    # ------------------------------------------------------------------------------------------ layouts (XLA)
    def to_kernel(self, x, dim: int):
        """`[B, *spatial, heads, D]` -> `[groups * B, heads, seq, dim]` (zero padded; dilation groups lead)."""
        nd = self.ndim
        for a in range(nd):
            x = blocking.pad_axis(x, 1 + a, self.dilation[a] * self.boxes[a] * self.tiles[a])
        shape = [self.batch]
        for a in range(nd):
            shape += [self.boxes[a], self.tiles[a], self.dilation[a]]
        x = x.reshape(shape + list(x.shape[-2:]))
        perm = [3 + 3 * a for a in range(nd)] + [0, 1 + 3 * nd] + [1 + 3 * a for a in range(nd)]
        perm += [2 + 3 * a for a in range(nd)] + [2 + 3 * nd]
        x = jnp.transpose(x, perm).reshape(self.groups * self.batch, x.shape[-2], self.seq, x.shape[-1])
        return blocking.pad_axis(x, 3, dim)

    def from_kernel(self, x, dim: int):
        """Inverse of `to_kernel` (drops padded tokens and features): `[B, *spatial, heads, dim]`."""
        nd = self.ndim
        heads = x.shape[1]
        x = x.reshape(list(self.dilation) + [self.batch, heads] + list(self.boxes) + list(self.tiles)
                      + [x.shape[-1]])
        perm = [nd]
        for a in range(nd):
            perm += [nd + 2 + a, 2 * nd + 2 + a, a]
        perm += [nd + 1, 3 * nd + 2]
        x = jnp.transpose(x, perm)
        x = x.reshape([self.batch] + [d * n * t for d, n, t in zip(self.dilation, self.boxes, self.tiles)]
                      + [heads, x.shape[-1]])
        return x[(slice(None),) + tuple(slice(0, n) for n in self.spatial) + (slice(None), slice(0, dim))]


@dataclasses.dataclass(frozen=True)
class Walk:
    """The boxes of one side visited by a box of the other side: the band per axis, rounded to whole boxes.

    Works on Python ints and traced scalars alike (index maps and kernel bodies). `ranges(box)` gives per axis
    `(first, stop)`; 'fori' walks `count(ranges)` steps with dynamic radices, 'grid' walks the static `steps`
    and skips steps whose digits fall outside a range (their block index repeats the last one: no new copy).
    """
    tiles: tuple[int, ...]
    boxes: tuple[int, ...]
    band: tuple[tuple[int, int], ...]

    @staticmethod
    def keys_of_queries(geo: Geometry) -> "Walk":
        return Walk(geo.tiles, geo.boxes, geo.band)

    @staticmethod
    def queries_of_keys(geo: Geometry) -> "Walk":
        return Walk(geo.tiles, geo.boxes, tuple(bands.transpose_band(*b) for b in geo.band))

    @property
    def spans(self) -> tuple[int, ...]:
        return tuple(bands.max_blocks(t, lo, hi, t, n) for t, n, (lo, hi) in zip(self.tiles, self.boxes, self.band))

    @property
    def steps(self) -> int:
        return math.prod(self.spans)

    def ranges(self, box):
        coords = unflatten(box, self.boxes)
        return [bands.block_range(c * t, t, lo, hi, t, n)
                for c, t, n, (lo, hi) in zip(coords, self.tiles, self.boxes, self.band)]

    def count(self, ranges):
        total = 1
        for first, stop in ranges:
            total = total * (stop - first)
        return total

    def fori_box(self, ranges, r):
        """Flat box index of step `r` of the dynamic walk."""
        counts = [jnp.maximum(stop - first, 1) for first, stop in ranges]
        digits = unflatten(r, counts)
        return flatten([first + j for (first, _), j in zip(ranges, digits)], self.boxes)

    def grid_box(self, ranges, r):
        digits = unflatten(r, self.spans)
        return flatten([bands.step_block(first, stop, j, n) for (first, stop), j, n in zip(ranges, digits, self.boxes)],
                       self.boxes)

    def grid_valid(self, ranges, r):
        digits = unflatten(r, self.spans)
        ok = True
        for (first, stop), j in zip(ranges, digits):
            ok = ok & (j < stop - first)
        return ok
