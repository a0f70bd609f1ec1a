"""The lightning scan in Triton, on the op's heads-last layout (no transposes, no padding).

Importing this module needs `triton` only (not jax-triton): the tests compile the kernel for sm_80/sm_90 and run
it under `TRITON_INTERPRET=1` with torch tensors; `triton.py` launches it from JAX. Launch arguments come from
`triton_launch.py`, shared by both.

Semantics and decay exponents are those of `pallas_scan.py` / `vjp.py`: `A, B [Bt, T, N, DA]`, `C [Bt, T, N, DC]`
contiguous; one program per (state column tile, batch x head) walks the `ceil(T / BLOCK)` row blocks in time order
(REVERSE: last to first) with the `[DA, BLOCK_C]` fp32 state in registers. Rows past T and feature columns past
DA/DC are masked loads of zeros (exact); the decay exponents of the last block count only its real rows.

HAS_DOCS (packed documents): `Docs`, `Enter`, `Leave` `[Bt, TP]` (int32 document ids, fp32 masks of
`jaxattn.core.segments`, padded to whole blocks with the edge document, TP = blocks x BLOCK): the intra-block
scores of other documents are dropped, the incoming state's term is weighted by `Enter`, the update's rows by
`Leave`, and the carried state by `keep`, `Enter` at the block's leaving row (the last forward, the first in
reverse).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _power(slope, exponent):
    """`lambda^max(exponent, 0)` in fp32, `lambda = exp(-slope)` (clamped: nothing overflows)."""
    return tl.exp(-slope * tl.maximum(exponent, 0).to(tl.float32))


@triton.jit
def _exponents(j, r, T: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Decay exponents of block `j`: incoming state per row, update weight per row, state across the block."""
    if REVERSE:
        n_end = tl.minimum(BLOCK, T - 1 - j * BLOCK)  # BLOCK, or n_valid - 1 in the block of the last real row
        e_row = n_end - r
        w_row = r
        whole = n_end
    else:
        n_valid = tl.minimum(BLOCK, T - j * BLOCK)
        e_row = r + 1
        w_row = n_valid - 1 - r
        whole = n_valid
    return e_row, w_row, whole


@triton.jit
def _load(ptrs, rows, cols, T: tl.constexpr, D: tl.constexpr, UNMASKED: tl.constexpr):
    """A `[rows, cols]` tile, zeros past row T and column D; UNMASKED when neither can happen (vector loads)."""
    if UNMASKED:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(rows[:, None] < T) & (cols[None, :] < D), other=0.0)


@triton.jit
def lightning_scan(A, Bk, C, Slopes, Init, Docs, Enter, Leave, Out, State,
                   T: tl.constexpr, N: tl.constexpr, DA: tl.constexpr, DC: tl.constexpr,
                   DAP: tl.constexpr, REVERSE: tl.constexpr, HAS_DECAY: tl.constexpr,
                   HAS_INIT: tl.constexpr, WANT_STATE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DOCS: tl.constexpr, TP: tl.constexpr):
    """Out `[Bt, T, N, DC]` (Out's dtype); State `[Bt, N, DA, DC]` fp32 when WANT_STATE; Init likewise when
    HAS_INIT; Slopes `[N]` fp32 when HAS_DECAY; Docs/Enter/Leave `[Bt, TP]` when HAS_DOCS. Unused pointers receive
    a dummy 1-element array."""
    pid_c = tl.program_id(0)
    bn = tl.program_id(1)
    b = (bn // N).to(tl.int64)
    n = (bn % N).to(tl.int64)
    r = tl.arange(0, BLOCK)
    da = tl.arange(0, DAP)
    dc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    a_base = A + b * (T * N * DA) + n * DA
    b_base = Bk + b * (T * N * DA) + n * DA
    c_base = C + b * (T * N * DC) + n * DC
    o_base = Out + b * (T * N * DC) + n * DC
    s_base = (b * N + n) * (DA * DC)  # int64 scalar; the tile's offsets are int32, computed where used
    if HAS_DECAY:
        slope = tl.load(Slopes + n)
    # Rows r (queries) and c (keys) of one block interact when dist >= 0.
    if REVERSE:
        dist = r[None, :] - r[:, None]
    else:
        dist = r[:, None] - r[None, :]
    if HAS_INIT:
        state = _load(Init + s_base + da[:, None] * DC + dc[None, :], da, dc, DA, DC, (DA == DAP) and (DC % BLOCK_C == 0))
    else:
        state = tl.zeros([DAP, BLOCK_C], tl.float32)
    num_blocks: tl.constexpr = (T + BLOCK - 1) // BLOCK
    EVEN_T: tl.constexpr = T % BLOCK == 0
    EVEN_A: tl.constexpr = DA == DAP
    EVEN_C: tl.constexpr = DC % BLOCK_C == 0  # the grid has ceil(DC / BLOCK_C) column tiles
    for i in range(num_blocks):
        if REVERSE:
            j = num_blocks - 1 - i
        else:
            j = i
        # Per-element offsets stay int32 (within one block); the block's base offset is int64.
        start = (j * BLOCK).to(tl.int64)
        a_tile = r[:, None] * (N * DA) + da[None, :]
        c_tile = r[:, None] * (N * DC) + dc[None, :]
        a = _load(a_base + start * (N * DA) + a_tile, j * BLOCK + r, da, T, DA, EVEN_T and EVEN_A)
        kb = _load(b_base + start * (N * DA) + a_tile, j * BLOCK + r, da, T, DA, EVEN_T and EVEN_A)
        c = _load(c_base + start * (N * DC) + c_tile, j * BLOCK + r, dc, T, DC, EVEN_T and EVEN_C)
        scores = tl.dot(a, tl.trans(kb), input_precision=PRECISION)
        if HAS_DECAY:
            scores = scores * _power(slope, dist)
        if HAS_DOCS:
            rows = b * TP + j * BLOCK + r
            docs = tl.load(Docs + rows)
            scores = tl.where((dist >= 0) & (docs[:, None] == docs[None, :]), scores, 0.0)
            enter = tl.load(Enter + rows)
            leave = tl.load(Leave + rows)
            keep = tl.load(Enter + b * TP + j * BLOCK + (0 if REVERSE else BLOCK - 1))
        else:
            scores = tl.where(dist >= 0, scores, 0.0)
        out = tl.dot(scores.to(c.dtype), c, input_precision=PRECISION)
        if HAS_DOCS:
            # The incoming state and the outgoing keys, masked to their documents (times the decay, if any).
            if HAS_DECAY:
                e_row, w_row, whole = _exponents(j, r, T, BLOCK, REVERSE)
                enter = enter * _power(slope, e_row)
                leave = leave * _power(slope, w_row)
                keep = keep * _power(slope, whole)
            out += tl.dot(a, state.to(a.dtype), input_precision=PRECISION) * enter[:, None]
            c = (c.to(tl.float32) * leave[:, None]).to(c.dtype)
            state = state * keep
        elif HAS_DECAY:
            e_row, w_row, whole = _exponents(j, r, T, BLOCK, REVERSE)
            out += tl.dot(a, state.to(a.dtype), input_precision=PRECISION) * _power(slope, e_row)[:, None]
            # The update's weights go on the rows of C (BLOCK_C wide, narrower than B): fewer live registers.
            c = (c.to(tl.float32) * _power(slope, w_row)[:, None]).to(c.dtype)
            state = state * _power(slope, whole)
        else:
            out += tl.dot(a, state.to(a.dtype), input_precision=PRECISION)
        out = out.to(Out.dtype.element_ty)
        if EVEN_T and EVEN_C:
            tl.store(o_base + start * (N * DC) + c_tile, out)
        else:
            tl.store(o_base + start * (N * DC) + c_tile, out, mask=((j * BLOCK + r)[:, None] < T) & (dc[None, :] < DC))
        state += tl.dot(tl.trans(kb), c, input_precision=PRECISION)
    if WANT_STATE:
        tl.store(State + s_base + da[:, None] * DC + dc[None, :], state, mask=(da[:, None] < DA) & (dc[None, :] < DC))
