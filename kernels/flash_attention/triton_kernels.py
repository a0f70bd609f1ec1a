"""Flash-attention kernels in Triton (forward, dk/dv, dq + dlogits), on the op's heads-last layout.

Importing this module needs `triton` only (not jax-triton): the tests compile these kernels for sm_80/sm_90 and
run them under `TRITON_INTERPRET=1` with torch tensors; `triton.py` launches them from JAX. The launch arguments
(grid, strides, band, block sizes) come from `triton_launch.py`, shared by both.

Semantics are those of `pallas.py`: key `j` is visible to query `i` iff `LOWER <= j - i <= UPPER` (each bound
optional; causal and local windows, aligned bottom-right, are such bands), it is a real key (`j < S`), and the
segment ids match. Blocks outside the band are never loaded. Attention sinks (`Sinks [N]` fp32) start each row's
online softmax as a key without value; a soft cap applies `CAP * tanh(s / CAP)` to the scaled logits before the
bias (the backward multiplies `1 - tanh^2` into the gradient reaching q and k). With `HAS_WALK`, the int32 table
of `walk.py` (`Walk`) gives each tile its blocks (per-head windows, `kv_lengths`, block masks) and the
per-(batch, head) band of its mask. Shapes and strides are compile-time constants (JAX
shapes are static, so nothing recompiles per call); batch/head offsets are computed in int64. Pointer arguments
that a call does not use (no bias, no segments) receive a dummy 1-element array.
"""
from __future__ import annotations

import triton
import triton.language as tl


BIG = tl.constexpr(1 << 30)  # an unbounded side of a dynamic band


@triton.jit
def _soft_cap(s, HAS_CAP: tl.constexpr, CAP: tl.constexpr):
    """`CAP * tanh(s / CAP)` (tanh through exp: exact at both tails, where exp over/underflows)."""
    if HAS_CAP:
        s = CAP * (1.0 - 2.0 / (tl.exp(s * (2.0 / CAP)) + 1.0))
    return s


@triton.jit
def _walk_row(b, n, t, W_BATCH: tl.constexpr, W_HEADS: tl.constexpr, W_TILES: tl.constexpr):
    """Row of tile `t` of (batch row `b`, query head `n`) in the walk table's count/index arrays."""
    row = t
    if W_HEADS > 1:
        row += n * W_TILES
    if W_BATCH > 1:
        row += b * (W_HEADS * W_TILES)
    return row


@triton.jit
def _walk_block(Walk, row, r, W_BATCH: tl.constexpr, W_HEADS: tl.constexpr, W_TILES: tl.constexpr,
                W_STEPS: tl.constexpr, W_COUNTS: tl.constexpr):
    """Block index of step `r` of the walk of `row`."""
    return tl.load(Walk + W_COUNTS + W_BATCH * W_HEADS * W_TILES + row * W_STEPS + r)


@triton.jit
def _dynamic_band(Walk, b, n, N: tl.constexpr, NB: tl.constexpr, S: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  WINDOWED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, OFFSET: tl.constexpr,
                  HAS_WINDOWS: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """`(lower, upper, kv_len)` of (batch row `b`, head `n`): bounds on `key_pos - query_pos` and the valid keys,
    from the table's per-head windows and per-row offsets/lengths (else the static ones)."""
    left = tl.full([], LEFT, tl.int32)
    right = tl.full([], RIGHT, tl.int32)
    offset = tl.full([], OFFSET, tl.int32)
    kv_len = tl.full([], S, tl.int32)
    if HAS_WINDOWS:
        left = tl.load(Walk + n)
        right = tl.load(Walk + N + n)
    if HAS_LENGTHS:
        offset = tl.load(Walk + 2 * N * HAS_WINDOWS + b)
        kv_len = tl.load(Walk + 2 * N * HAS_WINDOWS + NB + b)
    lower = tl.full([], -BIG, tl.int32)
    upper = tl.full([], BIG, tl.int32)
    if WINDOWED:
        lower = offset - left
        upper = offset + right
    if IS_CAUSAL:
        upper = tl.minimum(upper, offset)
    return lower, upper, kv_len


@triton.jit
def _walk_setup(Walk, b, n, t, lo, hi, BLOCK: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, S: tl.constexpr,
                IS_CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                OFFSET: tl.constexpr, HAS_WALK: tl.constexpr, W_BATCH: tl.constexpr, W_HEADS: tl.constexpr,
                W_TILES: tl.constexpr, W_COUNTS: tl.constexpr, HAS_WINDOWS: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """`(steps, row, lower, upper, kv_len)` of tile `t` of (batch row `b`, head `n`): the walk table's count, row
    and dynamic band with `HAS_WALK`, else the static band `[lo, hi)`'s block count (the rest unused)."""
    steps = tl.cdiv(hi - lo, BLOCK) + tl.zeros([], tl.int32)
    row = t + tl.zeros([], tl.int64)
    lower = tl.zeros([], tl.int32)
    upper = tl.zeros([], tl.int32)
    kv_len = tl.zeros([], tl.int32)
    if HAS_WALK:
        lower, upper, kv_len = _dynamic_band(Walk, b, n, N, NB, S, IS_CAUSAL, WINDOWED, LEFT, RIGHT, OFFSET,
                                             HAS_WINDOWS, HAS_LENGTHS)
        row = _walk_row(b, n, t, W_BATCH, W_HEADS, W_TILES).to(tl.int64)
        steps = tl.load(Walk + W_COUNTS + row)
    return steps, row, lower, upper, kv_len


@triton.jit
def _step_start(Walk, row, r, lo, BLOCK: tl.constexpr, HAS_WALK: tl.constexpr, W_BATCH: tl.constexpr,
                W_HEADS: tl.constexpr, W_TILES: tl.constexpr, W_STEPS: tl.constexpr, W_COUNTS: tl.constexpr):
    """First position of the block of step `r`: listed in the walk table, or the band's `lo + r * BLOCK`."""
    start = lo + r * BLOCK
    if HAS_WALK:
        start = _walk_block(Walk, row, r, W_BATCH, W_HEADS, W_TILES, W_STEPS, W_COUNTS) * BLOCK
    return start


@triton.jit
def _visible_dynamic(rows, cols, T: tl.constexpr, kv_len, lower, upper):
    """`_visible` with a band and key length known at run time."""
    return (cols < kv_len) & (rows < T) & (cols - rows >= lower) & (cols - rows <= upper)


@triton.jit
def _band_range(start, size: tl.constexpr, HAS_LOWER: tl.constexpr, LOWER: tl.constexpr,
                HAS_UPPER: tl.constexpr, UPPER: tl.constexpr, LENGTH: tl.constexpr, BLOCK: tl.constexpr):
    """First position and end (both multiples of BLOCK) of the blocks of the other axis that rows
    `start .. start + size - 1` can see; end <= first when none."""
    lo = 0
    hi = LENGTH
    if HAS_LOWER:
        lo = tl.minimum(tl.maximum(start + LOWER, 0), LENGTH)
    if HAS_UPPER:
        hi = tl.minimum(tl.maximum(start + size + UPPER, 0), LENGTH)
    return (lo // BLOCK) * BLOCK, tl.cdiv(hi, BLOCK) * BLOCK


@triton.jit
def _visible(rows, cols, T: tl.constexpr, S: tl.constexpr, HAS_LOWER: tl.constexpr, LOWER: tl.constexpr,
             HAS_UPPER: tl.constexpr, UPPER: tl.constexpr):
    """Boolean tile: query positions `rows` x key positions `cols` (broadcast shapes) inside the band and bounds."""
    keep = (cols < S) & (rows < T)
    if HAS_LOWER:
        keep = keep & (cols - rows >= LOWER)
    if HAS_UPPER:
        keep = keep & (cols - rows <= UPPER)
    return keep


@triton.jit
def flash_fwd(Q, K, V, Bias, QSeg, KSeg, Sinks, Walk, Out, Lse,
              T: tl.constexpr, S: tl.constexpr, N: tl.constexpr, GROUPS: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
              SQB: tl.constexpr, SQT: tl.constexpr, SQN: tl.constexpr,
              SKB: tl.constexpr, SKS: tl.constexpr, SKN: tl.constexpr,
              SVB: tl.constexpr, SVS: tl.constexpr, SVN: tl.constexpr,
              SBB: tl.constexpr, SBN: tl.constexpr, SBT: tl.constexpr, SBS: tl.constexpr,
              SCALE: tl.constexpr, HAS_LOWER: tl.constexpr, LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
              UPPER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
              HAS_SINKS: tl.constexpr, HAS_CAP: tl.constexpr, CAP: tl.constexpr,
              HAS_WALK: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, LEFT: tl.constexpr,
              RIGHT: tl.constexpr, OFFSET: tl.constexpr, W_BATCH: tl.constexpr, W_HEADS: tl.constexpr,
              W_TILES: tl.constexpr, W_STEPS: tl.constexpr, W_COUNTS: tl.constexpr, HAS_WINDOWS: tl.constexpr,
              HAS_LENGTHS: tl.constexpr, NB: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). Out is `[B, T, N, DV]`, Lse `[B, N, T]` fp32."""
    pid_m = tl.program_id(0)
    bn = tl.program_id(1)
    b = (bn // N).to(tl.int64)
    n = bn % N
    kh = (n // GROUPS).to(tl.int64)
    n = n.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q = tl.load(Q + b * SQB + n * SQN + rows[:, None] * SQT + d[None, :],
                mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)
    if HAS_SEG:
        q_seg = tl.load(QSeg + b * T + rows, mask=rows < T, other=-1)
    k_base = K + b * SKB + kh * SKN
    v_base = V + b * SVB + kh * SVN
    bias_base = Bias + b * SBB + n * SBN
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the sink: a key with no value, already in the running max and sum
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + n)
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    acc = tl.zeros([BLOCK_M, DVP], tl.float32)
    lo, hi = _band_range(pid_m * BLOCK_M, BLOCK_M, HAS_LOWER, LOWER, HAS_UPPER, UPPER, S, BLOCK_N)
    steps, row, lower, upper, kv_len = _walk_setup(Walk, b, n, pid_m, lo, hi, BLOCK_N, N, NB, S, IS_CAUSAL, WINDOWED,
                                                   LEFT, RIGHT, OFFSET, HAS_WALK, W_BATCH, W_HEADS, W_TILES,
                                                   W_COUNTS, HAS_WINDOWS, HAS_LENGTHS)
    for r in range(0, steps):
        start = _step_start(Walk, row, r, lo, BLOCK_N, HAS_WALK, W_BATCH, W_HEADS, W_TILES, W_STEPS, W_COUNTS)
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * SKS + d[None, :], mask=(cols[:, None] < S) & (d[None, :] < D),
                    other=0.0)
        s = _soft_cap(tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE, HAS_CAP, CAP)
        if HAS_BIAS:
            s += tl.load(bias_base + rows[:, None] * SBT + cols[None, :] * SBS,
                         mask=(rows[:, None] < T) & (cols[None, :] < S), other=0.0).to(tl.float32)
        if HAS_WALK:
            keep = _visible_dynamic(rows[:, None], cols[None, :], T, kv_len, lower, upper)
        else:
            keep = _visible(rows[:, None], cols[None, :], T, S, HAS_LOWER, LOWER, HAS_UPPER, UPPER)
        if HAS_SEG:
            k_seg = tl.load(KSeg + b * S + cols, mask=cols < S, other=-2)
            keep = keep & (q_seg[:, None] == k_seg[None, :])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = tl.load(v_base + cols[:, None] * SVS + dv[None, :], mask=(cols[:, None] < S) & (dv[None, :] < DV),
                    other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe), float("-inf"))
    # Out has the query's strides with DV for D (same layout, [B, T, N, DV]).
    tl.store(Out + b * (T * N * DV) + n * DV + rows[:, None] * (N * DV) + dv[None, :], out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < T) & (dv[None, :] < DV))
    tl.store(Lse + (b * N + n) * T + rows, lse, mask=rows < T)


@triton.jit
def flash_bwd_dkv(Q, K, V, Bias, QSeg, KSeg, Sinks, Walk, DO, Lse, Delta, DK, DV_,
                  T: tl.constexpr, S: tl.constexpr, N: tl.constexpr, GROUPS: tl.constexpr,
                  D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                  SQB: tl.constexpr, SQT: tl.constexpr, SQN: tl.constexpr,
                  SKB: tl.constexpr, SKS: tl.constexpr, SKN: tl.constexpr,
                  SVB: tl.constexpr, SVS: tl.constexpr, SVN: tl.constexpr,
                  SBB: tl.constexpr, SBN: tl.constexpr, SBT: tl.constexpr, SBS: tl.constexpr,
                  SCALE: tl.constexpr, HAS_LOWER: tl.constexpr, LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                  UPPER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
                  HAS_SINKS: tl.constexpr, HAS_CAP: tl.constexpr, CAP: tl.constexpr,
                  HAS_WALK: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, LEFT: tl.constexpr,
                  RIGHT: tl.constexpr, OFFSET: tl.constexpr, W_BATCH: tl.constexpr, W_HEADS: tl.constexpr,
                  W_TILES: tl.constexpr, W_STEPS: tl.constexpr, W_COUNTS: tl.constexpr, HAS_WINDOWS: tl.constexpr,
                  HAS_LENGTHS: tl.constexpr, NB: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head), summing over the GROUPS query heads that share it.
    Works on transposed tiles (`[keys, queries]`) so dk/dv accumulate without transposes. DO is `[B, T, N, DV]`,
    Lse (already 0 for empty rows) and Delta `[B, N, T]` fp32; DK/DV_ have the key/value layouts."""
    pid_n = tl.program_id(0)
    bk = tl.program_id(1)
    kv_heads = N // GROUPS
    b = (bk // kv_heads).to(tl.int64)
    kh = (bk % kv_heads).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    kmask = cols[:, None] < S
    k = tl.load(K + b * SKB + kh * SKN + cols[:, None] * SKS + d[None, :], mask=kmask & (d[None, :] < D), other=0.0)
    v = tl.load(V + b * SVB + kh * SVN + cols[:, None] * SVS + dv[None, :], mask=kmask & (dv[None, :] < DV),
                other=0.0)
    if HAS_SEG:
        k_seg = tl.load(KSeg + b * S + cols, mask=cols < S, other=-2)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dvacc = tl.zeros([BLOCK_N, DVP], tl.float32)
    # Queries that see these keys: the band seen from the key side (bounds negated and swapped).
    lo, hi = _band_range(pid_n * BLOCK_N, BLOCK_N, HAS_UPPER, -UPPER, HAS_LOWER, -LOWER, T, BLOCK_M)
    for g in range(GROUPS):
        n = kh * GROUPS + g
        steps, row, lower, upper, kv_len = _walk_setup(Walk, b, n, pid_n, lo, hi, BLOCK_M, N, NB, S, IS_CAUSAL,
                                                       WINDOWED, LEFT, RIGHT, OFFSET, HAS_WALK, W_BATCH, W_HEADS,
                                                       W_TILES, W_COUNTS, HAS_WINDOWS, HAS_LENGTHS)
        for r in range(0, steps):
            start = _step_start(Walk, row, r, lo, BLOCK_M, HAS_WALK, W_BATCH, W_HEADS, W_TILES, W_STEPS, W_COUNTS)
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows[None, :] < T
            qT = tl.load(Q + b * SQB + n * SQN + rows[None, :] * SQT + d[:, None], mask=rmask & (d[:, None] < D),
                         other=0.0)
            sT = _soft_cap(tl.dot(k, qT, input_precision=PRECISION) * SCALE, HAS_CAP, CAP)
            if HAS_CAP:
                cap_derivative = 1.0 - (sT / CAP) * (sT / CAP)
            if HAS_BIAS:
                sT += tl.load(Bias + b * SBB + n * SBN + rows[None, :] * SBT + cols[:, None] * SBS,
                              mask=rmask & kmask, other=0.0).to(tl.float32)
            if HAS_WALK:
                keep = _visible_dynamic(rows[None, :], cols[:, None], T, kv_len, lower, upper)
            else:
                keep = _visible(rows[None, :], cols[:, None], T, S, HAS_LOWER, LOWER, HAS_UPPER, UPPER)
            if HAS_SEG:
                q_seg = tl.load(QSeg + b * T + rows, mask=rows < T, other=-1)
                keep = keep & (k_seg[:, None] == q_seg[None, :])
            lse = tl.load(Lse + (b * N + n) * T + rows, mask=rows < T, other=0.0)
            pT = tl.where(keep, tl.exp(sT - lse[None, :]), 0.0)
            do = tl.load(DO + b * (T * N * DV) + n * DV + rows[:, None] * (N * DV) + dv[None, :],
                         mask=(rows[:, None] < T) & (dv[None, :] < DV), other=0.0)
            dvacc += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            delta = tl.load(Delta + (b * N + n) * T + rows, mask=rows < T, other=0.0)
            dsT = pT * (dpT - delta[None, :])
            if HAS_CAP:
                dsT = dsT * cap_derivative
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
    tl.store(DK + b * SKB + kh * SKN + cols[:, None] * SKS + d[None, :], (dk * SCALE).to(DK.dtype.element_ty),
             mask=kmask & (d[None, :] < D))
    tl.store(DV_ + b * SVB + kh * SVN + cols[:, None] * SVS + dv[None, :], dvacc.to(DV_.dtype.element_ty),
             mask=kmask & (dv[None, :] < DV))


@triton.jit
def flash_bwd_dq(Q, K, V, Bias, QSeg, KSeg, Sinks, Walk, DO, Lse, Delta, DQ, DS,
                 T: tl.constexpr, S: tl.constexpr, N: tl.constexpr, GROUPS: tl.constexpr,
                 D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                 SQB: tl.constexpr, SQT: tl.constexpr, SQN: tl.constexpr,
                 SKB: tl.constexpr, SKS: tl.constexpr, SKN: tl.constexpr,
                 SVB: tl.constexpr, SVS: tl.constexpr, SVN: tl.constexpr,
                 SBB: tl.constexpr, SBN: tl.constexpr, SBT: tl.constexpr, SBS: tl.constexpr,
                 SCALE: tl.constexpr, HAS_LOWER: tl.constexpr, LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                 UPPER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
                 HAS_SINKS: tl.constexpr, HAS_CAP: tl.constexpr, CAP: tl.constexpr,
                 HAS_WALK: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, LEFT: tl.constexpr,
                 RIGHT: tl.constexpr, OFFSET: tl.constexpr, W_BATCH: tl.constexpr, W_HEADS: tl.constexpr,
                 W_TILES: tl.constexpr, W_STEPS: tl.constexpr, W_COUNTS: tl.constexpr, HAS_WINDOWS: tl.constexpr,
                 HAS_LENGTHS: tl.constexpr, NB: tl.constexpr,
                 STORE_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). DQ has the query layout; with STORE_DS the logits'
    gradient of each visited tile goes to DS `[B, N, T, S]` fp32 (zeroed before the launch)."""
    pid_m = tl.program_id(0)
    bn = tl.program_id(1)
    b = (bn // N).to(tl.int64)
    n = bn % N
    kh = (n // GROUPS).to(tl.int64)
    n = n.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    rmask = rows[:, None] < T
    q = tl.load(Q + b * SQB + n * SQN + rows[:, None] * SQT + d[None, :], mask=rmask & (d[None, :] < D), other=0.0)
    do = tl.load(DO + b * (T * N * DV) + n * DV + rows[:, None] * (N * DV) + dv[None, :],
                 mask=rmask & (dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + (b * N + n) * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(Delta + (b * N + n) * T + rows, mask=rows < T, other=0.0)
    if HAS_SEG:
        q_seg = tl.load(QSeg + b * T + rows, mask=rows < T, other=-1)
    dq = tl.zeros([BLOCK_M, DP], tl.float32)
    lo, hi = _band_range(pid_m * BLOCK_M, BLOCK_M, HAS_LOWER, LOWER, HAS_UPPER, UPPER, S, BLOCK_N)
    steps, row, lower, upper, kv_len = _walk_setup(Walk, b, n, pid_m, lo, hi, BLOCK_N, N, NB, S, IS_CAUSAL, WINDOWED,
                                                   LEFT, RIGHT, OFFSET, HAS_WALK, W_BATCH, W_HEADS, W_TILES,
                                                   W_COUNTS, HAS_WINDOWS, HAS_LENGTHS)
    for r in range(0, steps):
        start = _step_start(Walk, row, r, lo, BLOCK_N, HAS_WALK, W_BATCH, W_HEADS, W_TILES, W_STEPS, W_COUNTS)
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols[None, :] < S
        kT = tl.load(K + b * SKB + kh * SKN + cols[None, :] * SKS + d[:, None], mask=cmask & (d[:, None] < D),
                     other=0.0)
        s = _soft_cap(tl.dot(q, kT, input_precision=PRECISION) * SCALE, HAS_CAP, CAP)
        if HAS_CAP:
            cap_derivative = 1.0 - (s / CAP) * (s / CAP)
        if HAS_BIAS:
            s += tl.load(Bias + b * SBB + n * SBN + rows[:, None] * SBT + cols[None, :] * SBS,
                         mask=rmask & cmask, other=0.0).to(tl.float32)
        if HAS_WALK:
            keep = _visible_dynamic(rows[:, None], cols[None, :], T, kv_len, lower, upper)
        else:
            keep = _visible(rows[:, None], cols[None, :], T, S, HAS_LOWER, LOWER, HAS_UPPER, UPPER)
        if HAS_SEG:
            k_seg = tl.load(KSeg + b * S + cols, mask=cols < S, other=-2)
            keep = keep & (q_seg[:, None] == k_seg[None, :])
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        vT = tl.load(V + b * SVB + kh * SVN + cols[None, :] * SVS + dv[:, None], mask=cmask & (dv[:, None] < DV),
                     other=0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            tl.store(DS + ((b * N + n) * T + rows[:, None]) * S + cols[None, :], ds, mask=rmask & cmask)
        if HAS_CAP:
            ds = ds * cap_derivative
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    tl.store(DQ + b * SQB + n * SQN + rows[:, None] * SQT + d[None, :], (dq * SCALE).to(DQ.dtype.element_ty),
             mask=rmask & (d[None, :] < D))
