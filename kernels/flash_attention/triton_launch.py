"""Launch plans of the Triton flash-attention kernels: grids, compile-time constants, warps and stages.

Pure Python on shapes, shared by the JAX launcher (`triton.py`, through `jax_triton.triton_call`) and the tests
(torch tensors under `TRITON_INTERPRET=1`, `triton.compile` for sm_80/sm_90), so what is tested is what runs.
Pointer arguments come first, in the order of `ARGS`, inputs then outputs (jax-triton passes outputs last).
"""
from __future__ import annotations

import dataclasses
import math

from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.flash_attention import walk as walks
from jaxattn.kernels.flash_attention.tile import Problem

ARGS = {
    "flash_fwd": ("Q", "K", "V", "Bias", "QSeg", "KSeg", "Sinks", "Walk", "Out", "Lse"),
    "flash_bwd_dkv": ("Q", "K", "V", "Bias", "QSeg", "KSeg", "Sinks", "Walk", "DO", "Lse", "Delta", "DK", "DV_"),
    "flash_bwd_dq": ("Q", "K", "V", "Bias", "QSeg", "KSeg", "Sinks", "Walk", "DO", "Lse", "Delta", "DQ", "DS"),
}
# (block_m, block_n, num_warps, num_stages) per kernel; block_n of dkv is its key block.
BLOCKS = {"flash_fwd": (128, 64, 4, 3), "flash_bwd_dkv": (64, 64, 4, 2), "flash_bwd_dq": (64, 64, 4, 2)}


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int]
    constexprs: dict
    num_warps: int
    num_stages: int
    walk: walks.Walk | None = None  # the layout of the walk table the kernel reads (`walk.build` with its tiles)


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def bias_strides(shape4) -> tuple[int, int, int, int]:
    """Strides of a contiguous 4-D bias `[Bb, Nb, Tb, Sb]` with 0 on its broadcast (size 1) axes."""
    return tuple(0 if dim == 1 else st for dim, st in zip(shape4, contiguous_strides(shape4)))


def plan(kernel: str, *, q_shape, k_shape, v_shape, bias_shape=None, segments=False, band=(None, None),
         scale: float, fp32: bool, store_ds: bool = False, blocks=None, problem: Problem | None = None,
         sinks: bool = False, block_mask_shape=None) -> Launch:
    """Launch of `kernel` for heads-last `q [B, T, N, D]`, `k [B, S, K, D]`, `v [B, S, K, DV]`, a 4-D bias
    broadcastable to `[B, N, T, S]` (or None) and the visible band `(lower, upper)` on `key_pos - query_pos`.
    `problem` (soft cap, per-head windows, key lengths, block shape) and `sinks` switch on those features; a
    dynamic problem's walk layout is `Launch.walk`."""
    b, t, n, d = q_shape
    s, kv_heads, dv = k_shape[1], k_shape[2], v_shape[3]
    block_m, block_n, warps, stages = blocks or BLOCKS[kernel]
    if problem is not None and problem.block_shape is not None:  # tiles inside the mask's blocks
        block_m = walks.preferred_block(block_m, problem.block_shape[0])
        block_n = walks.preferred_block(block_n, problem.block_shape[1])
    block_m = common_blocks.fit_block(t, block_m, "triton")
    block_n = common_blocks.fit_block(s, block_n, "triton")
    if problem is not None and problem.block_shape is not None:
        walks.check_block_shape(problem.block_shape, t, s, block_m, block_n, "triton")
    lower, upper = band
    sq, sk, sv = contiguous_strides(q_shape), contiguous_strides(k_shape), contiguous_strides(v_shape)
    sb = bias_strides(bias_shape) if bias_shape is not None else (0, 0, 0, 0)
    consts = dict(
        T=t, S=s, N=n, GROUPS=n // kv_heads, D=d, DV=dv,
        DP=common_blocks.feature_dim(d, "triton"), DVP=common_blocks.feature_dim(dv, "triton"),
        SQB=sq[0], SQT=sq[1], SQN=sq[2], SKB=sk[0], SKS=sk[1], SKN=sk[2], SVB=sv[0], SVS=sv[1], SVN=sv[2],
        SBB=sb[0], SBN=sb[1], SBT=sb[2], SBS=sb[3],
        SCALE=float(scale), HAS_LOWER=lower is not None, LOWER=int(lower or 0),
        HAS_UPPER=upper is not None, UPPER=int(upper or 0),
        HAS_BIAS=bias_shape is not None, HAS_SEG=bool(segments), PRECISION="ieee" if fp32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n)
    consts.update(HAS_SINKS=bool(sinks), HAS_CAP=False, CAP=1.0, HAS_WALK=False, IS_CAUSAL=False, WINDOWED=False,
                  LEFT=0, RIGHT=0, OFFSET=0, **walks.Walk(1, 1, 1, 1, b, n, False, False).constexprs())
    walk = None
    if problem is not None:
        cap = problem.logits_soft_cap
        consts.update(HAS_CAP=cap is not None, CAP=float(cap or 1.0))
    if problem is not None and problem.dynamic:
        window = problem.window or (0, 0)
        walk = walks.layout(problem, batch=b, heads=n, block_mask_shape=block_mask_shape, block_q=block_m,
                            block_k=block_n, num_q=math.ceil(t / block_m), num_k=math.ceil(s / block_n),
                            key_major=kernel == "flash_bwd_dkv")
        consts.update(HAS_WALK=True, IS_CAUSAL=problem.is_causal,
                      WINDOWED=problem.window is not None or problem.head_windows is not None,
                      LEFT=int(window[0]), RIGHT=int(window[1]), OFFSET=problem.causal_offset, **walk.constexprs())
    if kernel == "flash_bwd_dq":
        consts["STORE_DS"] = bool(store_ds)
    if kernel == "flash_bwd_dkv":
        grid = (math.ceil(s / block_n), b * kv_heads)
    else:
        grid = (math.ceil(t / block_m), b * n)
    return Launch(kernel, grid, consts, warps, stages, walk)


def signature(kernel: str, dtype: str, *, bias_dtype: str | None = None) -> dict[str, str]:
    """Triton pointer types of `kernel`'s arguments for `triton.compile` ('bf16', 'fp16' or 'fp32' data)."""
    types = {"Q": dtype, "K": dtype, "V": dtype, "Bias": bias_dtype or dtype, "QSeg": "i32", "KSeg": "i32",
             "Sinks": "fp32", "Walk": "i32",
             "Out": dtype, "Lse": "fp32", "DO": dtype, "Delta": "fp32", "DK": dtype, "DV_": dtype, "DQ": dtype,
             "DS": "fp32"}
    return {name: "*" + types[name] for name in ARGS[kernel]}
