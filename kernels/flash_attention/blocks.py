"""Tile sizes of the flash-attention kernels, per target, fitted to the call's lengths.

Starting points (not autotuned on hardware; see the benchmark):
- TPU: large tiles feed the 128x128 / 256x256 MXU and amortise the ~0.35 us per grid step; 512 x 512 forward,
  smaller key blocks in the backward where three `[bq, bk]` fp32 temporaries share VMEM.
- GPU (Triton): FlashAttention-2 style 128 x 64 forward; 64 x 64 backward (more accumulators live in registers).
- interpret: the CPU interpreter runs one grid step at a time, so bigger tiles are faster; tests pass small ones.
"""
from __future__ import annotations

import dataclasses

from jaxattn.kernels.common import blocks as common_blocks


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
# Triton launch settings for the Pallas-Triton kernels: (num_warps, num_stages).
TRITON_LAUNCH = {"fwd": (4, 2), "bwd": (4, 2)}


def fit(target: str, q_len: int, kv_len: int, requested: BlockSizes | None = None) -> BlockSizes:
    """Block sizes legal for `target` and no larger than needed, such that every query block divides the padded
    query length (likewise for keys): all kernels then share one padding of the inputs."""
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
