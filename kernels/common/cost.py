"""`pl.CostEstimate`s of the attention kernels, counted from the work each kernel really does.

A `pallas_call` is opaque to XLA: its cost analysis (and so `train.aot`'s FLOP and roofline figures) counts a
kernel only through the `cost_estimate` it is given. The kernels therefore count what they execute, not what the
math needs: every tile they visit (padding, the partial tiles of a causal or windowed band, the whole key
boxes of neighborhood windows), and none they skip.

Softmax attention (flash, neighborhood) walks one side and visits tiles of the other:
- the *walking* side is the query rows (forward, dq) or the key rows (dk/dv), read once and written once;
- every visited `[block_q, block_k]` tile is one pair; its logits cost the matmuls below, one `exp` each, and
  the visited side's block is read again for every pair (heads of a GQA group each read their key/value tiles).
Matmul FLOPs per logit (`2 * contraction`): forward `q k^T` + `p v` = `2 (H + Hv)`; dq recomputes `q k^T` and
adds `dO v^T`, `dS k` = `2 (2H + Hv)`; dk/dv recomputes `q k^T`, `dO v^T` and adds `dS^T q`, `P^T dO` =
`4 (H + Hv)`. Elementwise work (scale, mask, softmax updates) is a few operations per logit against `2 (H + Hv)`
and is not counted, as XLA counts no elementwise work inside a fusion's dots either.
"""
from __future__ import annotations

from jax.experimental import pallas as pl

PHASES = ("fwd", "dq", "dkv")
F32_BYTES = 4


def estimate(*, flops, transcendentals, bytes_accessed) -> pl.CostEstimate:
    """A `pl.CostEstimate` of Python ints (the counts may come in as numpy ints or floats)."""
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                           bytes_accessed=int(bytes_accessed))


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an `[m, k] x [k, n]` product (one multiply and one add per term)."""
    return 2 * m * n * k


def softmax_flops_per_logit(phase: str, h: int, hv: int) -> int:
    """Matmul FLOPs per computed logit of one softmax-attention kernel (see the module docstring)."""
    if phase not in PHASES:
        raise ValueError(f"`phase` must be one of {PHASES}, got {phase!r}")
    return {"fwd": 2 * (h + hv), "dq": 2 * (2 * h + hv), "dkv": 4 * (h + hv)}[phase]


def softmax_attention(phase: str, *, pairs: int, block_q: int, block_k: int, own_rows: int, h: int, hv: int,
                      itemsize: int, bias_itemsize: int | None = None, segment_ids: bool = False,
                      dlogits: bool = False, extra_flops: int = 0) -> pl.CostEstimate:
    """The estimate of one softmax-attention kernel.

    pairs: visited `[block_q, block_k]` tiles, summed over batch and every head that walks them;
    own_rows: rows of the walking side summed over batch and heads (queries x query heads for 'fwd' / 'dq', keys x
      key heads for 'dkv');
    itemsize: bytes per element of q, k, v, dO and of the outputs; lse and delta are fp32;
    bias_itemsize: a bias tile is read per pair (None: no bias); segment_ids: an int32 id per row of either side;
    dlogits: dq also writes each pair's fp32 dlogits tile (for the bias gradient);
    extra_flops: work beyond the matmuls that the caller counts itself (the neighborhood bias-table gradient).
    """
    logits = pairs * block_q * block_k
    flops = softmax_flops_per_logit(phase, h, hv) * logits + extra_flops
    if phase == "dkv":
        own = own_rows * 2 * (h + hv) * itemsize  # k, v in; dk, dv out
        visited = pairs * block_q * ((h + hv) * itemsize + 2 * F32_BYTES)  # q, dO, lse, delta
        visited_rows = block_q
    else:
        own = own_rows * ({"fwd": (h + hv) * itemsize + F32_BYTES,  # q in; out, lse out
                           "dq": (2 * h + hv) * itemsize + 2 * F32_BYTES}[phase])  # q, dO, lse, delta in; dq out
        visited = pairs * block_k * (h + hv) * itemsize  # k, v
        visited_rows = block_k
    if bias_itemsize is not None:
        visited += pairs * block_q * block_k * bias_itemsize
    if dlogits:
        visited += pairs * block_q * block_k * F32_BYTES
    if segment_ids:
        own += own_rows * 4
        visited += pairs * visited_rows * 4
    return estimate(flops=flops, transcendentals=logits, bytes_accessed=own + visited)
