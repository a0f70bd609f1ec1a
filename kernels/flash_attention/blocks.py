"""Tile sizes of the flash-attention kernels, per target (and TPU generation), fitted to the call's lengths.

TPU (Mosaic; the generation's figures are `kernels/common/tpu.py`'s, read from the mesh being lowered for):
- Each key tile is the MXU's N dimension in `q k^T` and its contraction in `p v`, each query tile its M
  dimension: multiples of the MXU side (128 on v4, v5e, v5p; 256 on v6e) fill whole passes.
- A forward step reads one `[block_k, H + Hv]` key/value tile and does `2 block_q block_k (H + Hv)` FLOPs: in
  bf16 that is `block_q` FLOPs per HBM byte (dq: `1.5 block_q` at H = Hv, from its key/value tiles; dk/dv:
  `2 block_k`, from its query/dO tiles). The tiles put every kernel above the chip's ridge point (peak bf16
  FLOP/s over HBM bandwidth, `../shared/reference/pods.md`: v4 ~230, v5e ~240, v5p ~170, v6e ~560 FLOP/byte)
  by 1.4x to 3x, so the kernels stay MXU-bound: forward 512 x 512, dk/dv 512 x 256, dq 256 x 512 on v4, v5e,
  v5p (512, 512, 384 FLOP/byte); forward 1024 x 512 and the backward 512 x 512 on v6e (1024, 1024, 768).
  Larger tiles also amortise the fixed cost of a grid step over more MXU work (the Pallas TPU pipelining
  guide), which matters most on v6e, whose MXUs are the fastest.
- The backward keeps smaller tiles on one side where three `[bq, bk]` fp32 temporaries (`p`, `dp`, `ds`)
  plus the logits live at once; on v6e the default scoped VMEM (32 MiB) holds 512 x 512 of them.
- VMEM: the kernels run under Mosaic's default scoped limit (16 MiB on v4, v5e and v5p, 32 MiB on v6e; they
  do not raise it), and `vmem_bytes` counts what one grid step holds (double-buffered blocks, scratch, the fp32
  `[bq, bk]` temporaries) for the worst case of a call (fp32 operands, an fp32 bias tile, segment ids, Hv = H).
  `fit` halves the larger tile of a kernel until that count is within `tpu.Generation.vmem_budget_bytes`
  (three quarters of the limit): no plan shrinks at H <= 256, the models' head dims are at most 128; the
  check guards larger ones.
- Without a TPU mesh in context (the generation unknown) the 128-MXU plan, which compiles on all four.
GPU (Triton): FlashAttention-2 style 128 x 64 forward; 64 x 64 backward (more accumulators live in registers).
interpret: the CPU interpreter runs one grid step at a time, so bigger tiles are faster; tests pass small ones.
"""
from __future__ import annotations

import dataclasses

from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import tpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query/key tile sizes of the three kernels: forward, dk/dv (one key block per program), dq (+ dbias)."""
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int

    @classmethod
    def uniform(cls, block_q: int, block_k: int) -> "BlockSizes":
        return cls(block_q, block_k, block_q, block_k, block_q, block_k)

    @property
    def q_blocks(self) -> tuple[int, int, int]:
        return self.block_q, self.block_q_dkv, self.block_q_dq

    @property
    def k_blocks(self) -> tuple[int, int, int]:
        return self.block_k, self.block_k_dkv, self.block_k_dq


DEFAULTS = {
    "tpu": BlockSizes(block_q=512, block_k=512, block_q_dkv=512, block_k_dkv=256, block_q_dq=256,
                      block_k_dq=512),
    "triton": BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64),
    "interpret": BlockSizes.uniform(128, 128),
}
# TPU plans per generation (the reasons are in the module docstring); the 128-MXU chips share DEFAULTS["tpu"].
TPU_PLANS = {
    "v4": DEFAULTS["tpu"],
    "v5e": DEFAULTS["tpu"],
    "v5p": DEFAULTS["tpu"],
    "v6e": BlockSizes(block_q=1024, block_k=512, block_q_dkv=512, block_k_dkv=512, block_q_dq=512,
                      block_k_dq=512),
    "unknown": DEFAULTS["tpu"],
}
# Triton launch settings for the Pallas-Triton kernels: (num_warps, num_stages).
TRITON_LAUNCH = {"fwd": (4, 2), "bwd": (4, 2)}
LANE_BYTES = tpu.LANES * 4  # a `[rows, 1]` fp32 column (lse, delta, m, l, q segment ids) occupies whole lanes


def vmem_bytes(phase: str, block_q: int, block_k: int, head_dim: int, itemsize: int = 4) -> int:
    """VMEM one grid step of kernel `phase` ('fwd', 'dq', 'dkv') holds in the worst case of a call: operands of
    `itemsize` bytes with Hv = H = `head_dim`, an fp32 bias tile (and, in dq, its fp32 dlogits tile), segment
    ids. Blocks are double-buffered; scratch and the fp32 `[bq, bk]` temporaries are single."""
    q_rows, kv_rows, tile = block_q * head_dim * itemsize, block_k * head_dim * itemsize, block_q * block_k * 4
    seg = block_q * LANE_BYTES + 8 * block_k * 4
    if phase == "fwd":  # q, k, v, out, lse, bias, segments; m, l, acc; logits, p and one more
        blocks = q_rows + 2 * kv_rows + q_rows + block_q * LANE_BYTES + tile + seg
        return 2 * blocks + 2 * block_q * LANE_BYTES + block_q * head_dim * 4 + 3 * tile
    if phase == "dq":  # q, dO, k, v, lse, delta, bias, segments, dq, dlogits; acc; s, p, dp, ds
        blocks = 3 * q_rows + 2 * kv_rows + 2 * block_q * LANE_BYTES + 2 * tile + seg
        return 2 * blocks + block_q * head_dim * 4 + 4 * tile
    if phase == "dkv":  # k, v, q, dO, lse, delta, bias, segments, dk, dv; dk, dv accumulators; s, p, dp, ds
        blocks = 4 * kv_rows + 2 * q_rows + 2 * block_q * LANE_BYTES + tile + seg
        return 2 * blocks + 2 * block_k * head_dim * 4 + 4 * tile
    raise ValueError(f"`phase` must be 'fwd', 'dq' or 'dkv', got {phase!r}")


def tpu_plan(generation: str | None = None, head_dim: int = 128) -> BlockSizes:
    """The TPU block sizes for `generation` (default: the mesh in context's), shrunk to its VMEM budget."""
    plan = tpu.plan(generation)
    sizes = TPU_PLANS[plan.name]
    fitted = []
    for phase, bq, bk in zip(("fwd", "dkv", "dq"), sizes.q_blocks, sizes.k_blocks):
        while vmem_bytes(phase, bq, bk, head_dim) > plan.vmem_budget_bytes and max(bq, bk) > tpu.LANES:
            bq, bk = (bq // 2, bk) if bq >= bk else (bq, bk // 2)
        fitted.append((bq, bk))
    (bq, bk), (bq_dkv, bk_dkv), (bq_dq, bk_dq) = fitted
    return BlockSizes(bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq)


def fit(target: str, q_len: int, kv_len: int, requested: BlockSizes | None = None, *, head_dim: int = 128,
        generation: str | None = None) -> BlockSizes:
    """Block sizes legal for `target` and no larger than needed, such that every query block divides the padded
    query length (likewise for keys): all kernels then share one padding of the inputs. On TPU the default is
    `tpu_plan(generation, head_dim)`."""
    if requested is None and target == "tpu":
        requested = tpu_plan(generation, head_dim)
    sizes = requested or DEFAULTS.get(target, DEFAULTS["interpret"])
    qs = _fit_axis(q_len, sizes.q_blocks, target, align=16)  # bf16 sublane tiles hold 16 rows
    ks = _fit_axis(kv_len, sizes.k_blocks, target, align=128)
    return BlockSizes(qs[0], ks[0], qs[1], ks[1], qs[2], ks[2])


def padded_lengths(sizes: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
    return (common_blocks.padded_length(q_len, max(sizes.q_blocks)),
            common_blocks.padded_length(kv_len, max(sizes.k_blocks)))


def _fit_axis(length: int, preferred: tuple[int, ...], target: str, *, align: int) -> tuple[int, ...]:
    base = common_blocks.fit_block(length, max(preferred), target, align=align)
    fitted = [common_blocks.fit_block(length, p, target, align=align) for p in preferred]
    return tuple(b if b <= base and base % b == 0 else base for b in fitted)
