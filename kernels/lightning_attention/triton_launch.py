"""Launch plans of the Triton lightning scan: grid, compile-time constants, warps and stages.

Pure Python on shapes, shared by the JAX launcher (`triton.py`, through `jax_triton.triton_call`) and the tests
(torch tensors under `TRITON_INTERPRET=1`, `triton.compile` for sm_80/sm_90), so what is tested is what runs.
Pointer arguments come in the order of `ARGS`, inputs then outputs (jax-triton passes outputs last).
"""
from __future__ import annotations

import dataclasses
import math

from jaxattn.kernels.common import blocks as common_blocks

ARGS = ("A", "Bk", "C", "Slopes", "Init", "Docs", "Enter", "Leave", "Out", "State")
# (block rows, state columns per program, num_warps, num_stages); see blocks.py for the reasoning. Chosen by
# compiling with ptxas and reading `cuobjdump -res-usage` (no GPU at hand to time them): at H = Hv = 128 in bf16,
# BLOCKS keeps every variant (decay or not, forward or reverse) free of register spills on sm_90 and spills least
# on sm_80 (~0.4 KB per thread; 64-column tiles: ~0.6 KB). Wider heads halve the rows; fp32 (IEEE dots on FMA
# units, no tensor cores) spills whatever the tiles (~0.9 KB at BLOCKS_FP32, several KB at the bf16 tiles).
BLOCKS = (64, 32, 8, 2)
BLOCKS_WIDE = (32, 32, 8, 2)  # padded head dim > 128
BLOCKS_FP32 = (32, 16, 4, 2)


def default_blocks(dim_a: int, fp32: bool) -> tuple[int, int, int, int]:
    if fp32:
        return BLOCKS_FP32
    return BLOCKS_WIDE if common_blocks.feature_dim(dim_a, "triton") > 128 else BLOCKS


@dataclasses.dataclass(frozen=True)
class Launch:
    grid: tuple[int, int]
    constexprs: dict
    num_warps: int
    num_stages: int


def plan(*, batch: int, length: int, heads: int, dim_a: int, dim_c: int, reverse: bool, decay: bool, init: bool,
         want_state: bool, fp32: bool, blocks=None, documents: bool = False) -> Launch:
    """Launch of one scan over heads-last `a, b [batch, length, heads, dim_a]`, `c [batch, length, heads, dim_c]`
    (`documents`: with the document masks, `[batch, TP]` with TP = `padded_length`)."""
    block, block_c, warps, stages = blocks or default_blocks(dim_a, fp32)
    block = common_blocks.fit_block(length, block, "triton")
    dap = common_blocks.feature_dim(dim_a, "triton")
    dcp = common_blocks.feature_dim(dim_c, "triton")
    block_c = min(max(16, common_blocks.next_power_of_2(block_c)), dcp)
    consts = dict(T=length, N=heads, DA=dim_a, DC=dim_c, DAP=dap, REVERSE=bool(reverse),
                  HAS_DECAY=bool(decay), HAS_INIT=bool(init), WANT_STATE=bool(want_state),
                  PRECISION="ieee" if fp32 else "tf32", BLOCK=block, BLOCK_C=block_c, HAS_DOCS=bool(documents),
                  TP=common_blocks.padded_length(length, block))
    return Launch((math.ceil(dim_c / block_c), batch * heads), consts, warps, stages)


def signature(dtype: str) -> dict[str, str]:
    """Triton pointer types of the kernel's arguments for `triton.compile` ('bf16', 'fp16' or 'fp32' data)."""
    types = {"A": dtype, "Bk": dtype, "C": dtype, "Slopes": "fp32", "Init": "fp32", "Docs": "i32", "Enter": "fp32",
             "Leave": "fp32", "Out": dtype, "State": "fp32"}
    return {name: "*" + types[name] for name in ARGS}
