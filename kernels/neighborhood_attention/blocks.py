"""Box (tile) sizes of the neighborhood-attention kernels per target: `t1 x .. x tn` group indices per box.

A box is both a query tile and a key block, so `prod(t)` is the matmul's M and N. Starting points, not tuned on
hardware:
- TPU: 128 rows (1-D 128, 2-D 8x16, 3-D 4x4x8): a multiple of 128, as the key block is the logits' lane
  dimension; tiles are never shrunk below that unless the whole group grid fits one box (then the block is the
  full, unpadded grid, legal at any size).
- GPU (Pallas-Triton): powers of two, 32 rows (1-D 32, 2-D 4x8, 3-D 2x4x4), at least 16 (`tl.dot`); shrunk
  along axes shorter than the tile. Small boxes waste less: 2-D 56x56 k=7 computes 397 logits per query with
  4x8 boxes against 472 with 8x8 (49 are needed), 1-D k=13 96 per query with 32-token boxes against 191 with 64.
- interpret: as GPU, without the minimum; tests pass small boxes to exercise many of them.
A query box visits the key boxes its halo touches: at most `prod(ceil((t + k - 1) / t) + 1)` (2-3 per axis for
k <= t); TPU's 128-token key blocks make that 380 logits per query at 1-D k=13 and 869 at 2-D 56x56 k=7.
"""
from __future__ import annotations

import math

from jaxattn.kernels.common import blocks as common_blocks

DEFAULTS = {
    "tpu": {1: (128,), 2: (8, 16), 3: (4, 4, 8)},
    "triton": {1: (32,), 2: (4, 8), 3: (2, 4, 4)},
    "interpret": {1: (32,), 2: (4, 8), 3: (2, 4, 4)},
}
TPU_LANES = 128
TRITON_MIN_ROWS = 16
# Triton launch settings of the Pallas-Triton kernels: (num_warps, num_stages).
TRITON_LAUNCH = {"fwd": (4, 2), "bwd": (4, 2)}


def fit(target: str, group_len: tuple[int, ...], requested: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Box extents for `target` and the group grid `group_len` (the longest dilation group per axis)."""
    nd = len(group_len)
    family = "tpu" if target in ("tpu", "tpu_interpret") else ("triton" if target == "triton" else "interpret")
    if requested is not None:
        tiles = tuple(int(t) for t in requested)
        if len(tiles) != nd or min(tiles) < 1:
            raise ValueError(f"`tiles` must be {nd} positive ints (one per spatial axis), got {requested!r}")
        if target == "tpu" and math.prod(tiles) % TPU_LANES and any(t < g for t, g in zip(tiles, group_len)):
            raise ValueError(f"on TPU a box must hold a multiple of {TPU_LANES} tokens (or the whole grid "
                             f"{group_len}), got tiles {tiles}")
        if target == "triton" and (any(t & (t - 1) for t in tiles) or math.prod(tiles) < TRITON_MIN_ROWS):
            raise ValueError(f"on GPU box extents must be powers of two with >= {TRITON_MIN_ROWS} tokens, "
                             f"got tiles {tiles}")
        return tiles
    tiles = DEFAULTS[family][nd]
    if family == "tpu":
        if all(g <= t for g, t in zip(group_len, tiles)) or math.prod(group_len) <= math.prod(tiles):
            return tuple(group_len)  # one box holds everything: full extents are always legal
        return tiles
    tiles = [min(t, common_blocks.next_power_of_2(g)) for t, g in zip(tiles, group_len)]
    if family == "triton":
        a = nd - 1
        while math.prod(tiles) < TRITON_MIN_ROWS:  # grow the contiguous axis first
            tiles[a] *= 2
            if tiles[a] >= common_blocks.next_power_of_2(group_len[a]) and a > 0:
                a -= 1
    return tuple(tiles)
