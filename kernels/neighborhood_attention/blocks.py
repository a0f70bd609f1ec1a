"""Tile sizes of the neighborhood-attention kernels per target: query tiles and key boxes, chosen independently.

One kernel step computes a `[block_q, block_k]` logit tile (`block_q = prod(query tile)`, `block_k = prod(key
box)`), and each query tile visits the key boxes its windows touch (`geometry.py`). How many logits that
computes, against the `prod(k)` per query its windows need, depends on the tile shapes and on the problem, so
`fit` picks the shapes per call: among per-axis powers of two with the target's `block_q` and `block_k`, the
pair that computes the fewest logits (`Geometry.computed_logits`, counted exactly from the walk tables).

The sizes are each target's hardware granule, no larger (small windows waste the least with the smallest tiles):
- TPU: the MXU width (`kernels/common/tpu.py`). A logit tile feeds `q k^T` (`block_k` MXU columns) and `p v`
  (contracting over `block_k`) and is softmaxed over `block_k` lanes: a narrower tile still costs a whole MXU
  pass and whole 128-lane vregs, a wider one only adds logits outside the windows. So `block_q = block_k =` 128
  on v4, v5e and v5p (4 MXUs of 128 x 128 per TensorCore) and 256 on v6e (2 MXUs of 256 x 256). VMEM does not
  bind: a step holds double-buffered q/k/v/bias blocks, fp32 logits and accumulators, about 3 MiB at 256 x 256
  and H = 128, within the 16 MiB every generation gives a kernel by default.
  The generation is read from the device the program is lowered for (`tpu.current_generation()`: the abstract
  mesh's device kind, else the default device); without one (a CPU host with no TPU mesh) the 128 plan, which
  is v4/v5e/v5p's and legal on v6e. Each grid step also costs about 0.35 us, which favours larger tiles when
  head dims are small; that trade is for a TPU run of `benchmarks/kernels.py` to settle (`tiles=`,
  `key_tiles=`).
- GPU (Pallas-Triton): 16 x 16, `tl.dot`'s smallest operands (one m16n8k16 tensor-core tile pair), one warp
  per 16 query rows; the GPU runs the many small programs side by side, with no per-step cost to amortise.
- interpret: as GPU; tests pass small tiles of their own.
When the whole group grid holds no more tokens than a tile, one tile holds it (full extents are legal anywhere).
"""
from __future__ import annotations

import functools
import itertools
import math

from jaxattn.core import neighborhood_windows as windows
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import tpu
from jaxattn.kernels.neighborhood_attention.geometry import Geometry

TPU_SUBLANES = tpu.SUBLANES
tpu_generation = tpu.current_generation  # the generation the tiles follow (read by the compile tests)
TRITON_ROWS = 16  # tl.dot's smallest M, N and K; one warp per 16 query rows
TRITON_MAX_WARPS = 4
TRITON_STAGES = 2


def granule(target: str, generation: str | None = None) -> int:
    """Rows of a query tile and keys of a key box for `target` (and TPU `generation`, default detected)."""
    if target in ("tpu", "tpu_interpret"):
        return tpu.plan(generation).mxu
    return TRITON_ROWS


def triton_warps(block_q: int) -> int:
    return max(1, min(TRITON_MAX_WARPS, block_q // TRITON_ROWS))


def fit(target: str, spatial: tuple[int, ...], spec: windows.NASpec, query_tiles=None, key_tiles=None,
        generation: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(query_tiles, key_tiles)` for a call on `spatial` with `spec`: requested ones are checked against the
    target's rules, missing ones chosen as above."""
    group_len = tuple(-(-n // d) for n, d in zip(spatial, spec.dilation))
    query_tiles = _check(target, "tiles", query_tiles, group_len)
    key_tiles = _check(target, "key_tiles", key_tiles, group_len)
    if query_tiles is not None and key_tiles is not None:
        return query_tiles, key_tiles
    return best_tiles(target, spatial, spec, granule(target, generation), query_tiles, key_tiles)


def best_tiles(target: str, spatial: tuple[int, ...], spec: windows.NASpec, rows: int, query_tiles=None,
               key_tiles=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The `(query_tiles, key_tiles)` of `rows` tokens each (power-of-two extents; fixed where given) that compute
    the fewest logits, then take the fewest grid steps, then have the longest contiguous (last) query axis."""
    group_len = tuple(-(-n // d) for n, d in zip(spatial, spec.dilation))
    shapes = _shapes(target, rows, group_len)
    return _search(tuple(spatial), spec, (tuple(query_tiles),) if query_tiles else shapes,
                   (tuple(key_tiles),) if key_tiles else shapes)


def _check(target, name, tiles, group_len):
    if tiles is None:
        return None
    nd = len(group_len)
    tiles = (tiles,) * nd if isinstance(tiles, int) else tuple(int(t) for t in tiles)
    if len(tiles) != nd or min(tiles) < 1:
        raise ValueError(f"`{name}` must be {nd} positive ints (one per spatial axis), got {tiles!r}")
    rows, whole = math.prod(tiles), all(t >= g for t, g in zip(tiles, group_len))
    if target == "tpu" and rows % TPU_SUBLANES and not whole:
        raise ValueError(f"on TPU a tile must hold a multiple of {TPU_SUBLANES} tokens (or the whole group grid "
                         f"{group_len}), got `{name}` {tiles}")
    if target == "triton" and (any(t & (t - 1) for t in tiles) or rows < TRITON_ROWS):
        raise ValueError(f"on GPU tile extents must be powers of two with >= {TRITON_ROWS} tokens, got `{name}` "
                         f"{tiles}")
    return tiles


def _shapes(target: str, rows: int, group_len: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per-axis powers of two with `rows` tokens, none longer than its axis needs. A grid of fewer tokens is one
    tile: its exact extents on TPU (a full block), powers of two on GPU with the last axis grown to `rows`."""
    caps = [common_blocks.next_power_of_2(g) for g in group_len]
    if target in ("tpu", "tpu_interpret") and math.prod(group_len) <= rows:
        return (tuple(group_len),)
    if math.prod(caps) <= rows:
        return (tuple(caps[:-1]) + (caps[-1] * rows // math.prod(caps),),)
    options = [[1 << e for e in range(cap.bit_length())] for cap in caps]
    return tuple(s for s in itertools.product(*options) if math.prod(s) == rows)


@functools.lru_cache(maxsize=256)
def _search(spatial, spec: windows.NASpec, query_options, key_options):
    best = None
    for tq in query_options:
        for tk in key_options:
            geo = Geometry(1, spatial, 1, 1, spec.kernel_size, spec.dilation, spec.stride, spec.is_causal, tq, tk)
            walk, _ = geo.keys_of_queries()
            cost = (geo.computed_logits, geo.num_query_tiles * walk.steps, tuple(-t for t in tq[::-1]))
            if best is None or cost < best[0]:
                best = (cost, tq, tk)
    return best[1], best[2]
