"""Block sizes of the lightning-attention scans, per target (and TPU generation).

A scan step handles `block` rows: an intra-block `[block, block]` decayed score matrix (quadratic, parallel over
the block, computed whole and masked: half of it is causal waste) plus the inter-block term through the carried
`[Da, Dc]` fp32 state. Per row that costs `2 block (Da + Dc)` intra against `4 Da Dc` inter FLOPs, and one step
reads `block (2 Da + 2 Dc)` elements (a, b, c, out), so in bf16 at Da = Dc = d a step does `block / 2 + d / 2`
FLOPs per HBM byte (`kernels/common/cost.py` counts the same work).
- TPU: the block is the M dimension of `A B^T` and `A S` and the contraction of `(.) C`: a multiple of the MXU
  side (`kernels/common/tpu.py`). It is the smallest such block whose steps reach about the chip's ridge point
  (peak bf16 FLOP/s over HBM bandwidth, `../shared/reference/pods.md`: v4 ~230, v5e ~240, v5p ~170, v6e ~560
  FLOP/byte) at d = 128: up to there a larger block only turns HBM time into (partly wasted) MXU work, beyond
  it the causal waste costs time. v4 and v5e: 512 (320 FLOP/byte; 256 would stay HBM-bound at 192); v5p: 256
  (192); v6e: 512, below its ridge: at 1024 the `[L, L]` decay tile, recomputed every grid step, costs
  `L` exponentials per row on the vector units, as much as the MXU work it would feed. A grid step also has a
  fixed cost (the Pallas TPU pipelining guide), which the larger blocks amortise. The whole value width per
  program (the state lives in VMEM scratch). VMEM does not bind: `vmem_bytes` at 512 rows and d = 256 in fp32
  is under 10 MiB, within every generation's default scoped limit; `fit` halves the block if it would not
  (and, at 128 rows, splits the state's value columns).
  Without a TPU mesh in context (generation unknown): 256, which compiles everywhere.
- GPU (Triton): 64 rows and 32 state columns per program, 8 warps: the `[Da, 32]` fp32 state stays in
  registers and splitting the value columns multiplies the programs by `Dc / 32` (columns of the state are
  independent; the intra-block scores are recomputed per column tile). See `triton_launch.BLOCKS`.
- interpret: small blocks keep the CPU interpreter's work low; tests pass their own.
"""
from __future__ import annotations

import dataclasses

from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import platform, tpu


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
TPU_PLANS = {"v4": BlockSizes(512), "v5e": BlockSizes(512), "v5p": BlockSizes(256), "v6e": BlockSizes(512),
             "unknown": DEFAULTS["tpu"]}
# (num_warps, num_stages) of the Pallas-Triton scan.
TRITON_LAUNCH = (8, 2)


def _rules(target: str) -> str:
    """Which tiling rules apply: the TPU simulator follows TPU's, so tests see TPU-legal blocks."""
    return "tpu" if platform.tpu_like(target) else target


def vmem_bytes(block: int, da: int, dc: int, itemsize: int = 4) -> int:
    """VMEM one grid step holds: double-buffered a, b, c, out row blocks and fp32 init/state blocks, the fp32
    state scratch, and the `[L, L]` scores, decay and distance temporaries (fp32 / int32)."""
    rows = block * (2 * da + 2 * dc) * itemsize
    state = da * dc * 4
    return 2 * (rows + 2 * state) + state + 3 * block * block * 4 + 2 * block * da * 4


def tpu_plan(generation: str | None = None, head_dim: int = 128) -> BlockSizes:
    """The TPU block for `generation` (default: the mesh in context's), halved until it fits the VMEM budget;
    past 128 rows the state's value columns are split instead (`value_tile`, multiples of 128 lanes)."""
    plan = tpu.plan(generation)
    block, width = TPU_PLANS[plan.name].block, head_dim
    while vmem_bytes(block, head_dim, width) > plan.vmem_budget_bytes:
        if block > tpu.LANES:
            block //= 2
        elif width > tpu.LANES and width % (2 * tpu.LANES) == 0:
            width //= 2
        else:
            break
    return BlockSizes(block, None if width == head_dim else width)


def fit(target: str, length: int, requested: BlockSizes | None = None, *, head_dim: int = 128,
        generation: str | None = None) -> BlockSizes:
    """Block sizes legal for `target`, the row block shrunk for short sequences (bf16 tiles hold 16 rows on TPU);
    on TPU the default is `tpu_plan(generation, head_dim)`."""
    rules = _rules(target)
    if requested is None and target == "tpu":
        requested = tpu_plan(generation, head_dim)
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
