"""Cost estimates of the flash-attention kernels: the tiles each kernel visits, counted from the band it walks.

The kernels visit, per query block, the key blocks `Problem.kv_blocks` gives (forward, dq), and per key block the
query blocks `Problem.q_blocks` gives, for every query head of its GQA group (dk/dv); blocks outside the causal /
window band are skipped, padding tiles inside it are computed. The same band functions count them here on Python
ints, so the estimate follows whatever the kernels skip. The per-tile arithmetic is `kernels/common/cost.py`'s.
"""
from __future__ import annotations

from jax.experimental import pallas as pl

from jaxattn.kernels.common import cost
from jaxattn.kernels.flash_attention.tile import Problem


def query_major_pairs(problem: Problem, block_q: int, block_k: int, q_len_p: int, kv_len_p: int) -> int:
    """Tiles visited by one head of a query-major kernel (forward, dq): key blocks summed over query blocks."""
    nk = kv_len_p // block_k
    return sum(stop - first for first, stop in
               (problem.kv_blocks(i, block_q, block_k, nk) for i in range(q_len_p // block_q)))


def key_major_pairs(problem: Problem, block_q: int, block_k: int, q_len_p: int, kv_len_p: int) -> int:
    """Tiles visited per query head by the dk/dv kernel: query blocks summed over key blocks."""
    nq = q_len_p // block_q
    return sum(stop - first for first, stop in
               (problem.q_blocks(j, block_k, block_q, nq) for j in range(kv_len_p // block_k)))


def kernel_cost(phase: str, problem: Problem, q, k, v, bias, q_seg, *, block_q: int, block_k: int,
                dlogits: bool = False) -> pl.CostEstimate:
    """The estimate of one kernel from its operands in the kernel layout (`q [B, N, Tp, H]`, `k [B, K, Sp, H]`,
    `v [B, K, Sp, Hv]`, bias `[Bb, Nb, Tp, Sp]` or None, q segment ids or None; shapes only are read)."""
    b, n, tp, h = q.shape
    kv_heads, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    if phase == "dkv":
        pairs = key_major_pairs(problem, block_q, block_k, tp, sp)
        own_rows = b * kv_heads * sp
    else:
        pairs = query_major_pairs(problem, block_q, block_k, tp, sp)
        own_rows = b * n * tp
    return cost.softmax_attention(
        phase, pairs=pairs * b * n, block_q=block_q, block_k=block_k, own_rows=own_rows, h=h, hv=hv,
        itemsize=q.dtype.itemsize, bias_itemsize=None if bias is None else bias.dtype.itemsize,
        segment_ids=q_seg is not None, dlogits=dlogits)
