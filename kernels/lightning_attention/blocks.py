"""Block sizes of the lightning-attention scans, per target.

A scan step handles `block` rows: an intra-block `[block, block]` decayed score matrix (quadratic, parallel over
the block) plus the inter-block term through the carried `[Da, Dc]` fp32 state. Per row that costs
`~2 * block * (Da + Dc)` intra against `~4 * Da * Dc` inter FLOPs, so the block trades MXU/tensor-core
occupancy against wasted causal work. Starting points (not tuned on hardware; see benchmarks/kernels.py):
- TPU: 256 rows (fills the 256-wide MXU of v6e, two passes of v5e's 128; 32 grid steps at T = 8192), the whole
  value width per program (the state lives in VMEM scratch).
- GPU (Triton): 64 rows and 32 state columns per program, 8 warps: the `[Da, 32]` fp32 state stays in
  registers and splitting the value columns multiplies the programs by `Dc / 32` (columns of the state are
  independent; the intra-block scores are recomputed per column tile). See `triton_launch.BLOCKS`.
- interpret: small blocks keep the CPU interpreter's work low; tests pass their own.
"""
from __future__ import annotations

import dataclasses

from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import platform


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """`block`: rows per scan step; `value_tile`: state columns per program (None: all of them)."""
    block: int
    value_tile: int | None = None

    def __post_init__(self):
        if self.block < 1 or (self.value_tile is not None and self.value_tile < 1):
            raise ValueError(f"block sizes must be positive, got {self}")


DEFAULTS = {
    "tpu": BlockSizes(256),
    "triton": BlockSizes(64, 32),
    "interpret": BlockSizes(64),
}
# (num_warps, num_stages) of the Pallas-Triton scan.
TRITON_LAUNCH = (8, 2)


def _rules(target: str) -> str:
    """Which tiling rules apply: the TPU simulator follows TPU's, so tests see TPU-legal blocks."""
    return "tpu" if platform.tpu_like(target) else target


def fit(target: str, length: int, requested: BlockSizes | None = None) -> BlockSizes:
    """Block sizes legal for `target`, the row block shrunk for short sequences (bf16 tiles hold 16 rows on TPU)."""
    rules = _rules(target)
    sizes = requested or DEFAULTS.get(rules, DEFAULTS["interpret"])
    block = common_blocks.fit_block(length, sizes.block, rules, align=16)
    tile = sizes.value_tile
    if tile is not None and rules == "triton":
        tile = max(16, common_blocks.next_power_of_2(tile))
    return BlockSizes(block, tile)


def value_tile(sizes: BlockSizes, width: int) -> int:
    """State columns per program for a value width `width` (already padded for the target): divides `width`."""
    tile = sizes.value_tile
    if tile is None or tile >= width or width % tile:
        return width
    return tile


def feature_dim(dim: int, target: str) -> int:
    """Feature width as the kernel sees it (Triton tiles need powers of two >= 16; zero padding is exact)."""
    return common_blocks.feature_dim(dim, _rules(target))
