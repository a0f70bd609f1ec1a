"""What every flash-attention tile computes, shared by the forward, dq and dk/dv kernel bodies.

A tile is `q[block_q, H] x k[block_k, H]^T`: fp32 logits, scaled, soft-capped (`cap * tanh(s / cap)`) when
asked, plus the bias tile, with masked entries at `-inf` (the masks come from positions through
`jaxattn.core.masks`, exactly as the reference builds them). `Problem` is the static description of the masking;
its bands give the blocks a tile row or column can see, so blocks wholly outside the causal/window band are never
visited. Per-head windows, per-batch key lengths and block masks are dynamic: `walk.py` turns them into tables of
the blocks each tile visits, and `TileMask` carries the per-(batch, head) window, offset and length of one tile.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxattn.core import masks, softmax
from jaxattn.kernels.common import bands


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static masking and scaling of one attention call (hashable: a jit / custom_vjp static argument)."""
    scale: float
    q_len: int  # T, before padding
    kv_len: int  # S, before padding
    is_causal: bool = False
    window: tuple[int, int] | None = None  # (left, right) around the diagonal
    causal_offset: int = 0  # S - T: the diagonal is aligned bottom-right
    logits_soft_cap: float | None = None  # s <- cap * tanh(s / cap) on the scaled logits, before bias and masks
    head_windows: tuple[tuple[int, int], ...] | None = None  # one (left, right) per query head (replaces window)
    kv_lengths: bool = False  # per-batch valid key lengths (an operand): keys >= kv_lengths[b] are masked and
    # the diagonal moves by kv_lengths[b] - S
    block_shape: tuple[int, int] | None = None  # (bq, bk) of a block mask operand

    @classmethod
    def of(cls, q_len: int, kv_len: int, head_dim: int, *, scale=None, is_causal=False, window=None,
           causal_offset=None, logits_soft_cap=None, kv_lengths=False, block_shape=None,
           num_heads: int | None = None) -> "Problem":
        """From the op's arguments: default scale `head_dim ** -0.5`, default offset `S - T` (bottom-right).
        `window` is None, one window for every head, or a sequence of `num_heads` per-query-head `(left, right)`
        pairs (None entries: global heads; `masks.per_head_windows`)."""
        head_windows = None
        if is_per_head(window):
            head_windows = masks.per_head_windows(window, num_heads, q_len, kv_len)
            window = None
        if logits_soft_cap is not None and not float(logits_soft_cap) > 0:
            raise ValueError(f"`logits_soft_cap` must be a positive float, got {logits_soft_cap!r}")
        return cls(scale=float(head_dim ** -0.5 if scale is None else scale), q_len=q_len, kv_len=kv_len,
                   is_causal=bool(is_causal), window=masks.normalize_window(window),
                   causal_offset=kv_len - q_len if causal_offset is None else int(causal_offset),
                   logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                   head_windows=head_windows, kv_lengths=bool(kv_lengths),
                   block_shape=None if block_shape is None else tuple(int(x) for x in block_shape))

    @property
    def dynamic(self) -> bool:
        """Whether the visited blocks depend on the head, the batch row or an operand (`walk.py` tables)."""
        return self.head_windows is not None or self.kv_lengths or self.block_shape is not None

    @property
    def band(self) -> tuple[int | None, int | None]:
        """Bounds on `key_pos - query_pos` of the visible keys (None: unbounded); per-head windows: the widest."""
        if self.head_windows is None:
            return band(self.is_causal, self.window, self.causal_offset)
        lowers, uppers = zip(*(band(self.is_causal, w, self.causal_offset) for w in self.head_windows))
        return min(lowers), max(uppers)

    def max_band_blocks(self, size: int, block: int, num: int, *, transpose: bool = False) -> int:
        """Static bound on the blocks one tile of `size` sees across its band, for every head and key length
        (a key length shifts the band without widening it)."""
        windows = self.head_windows or (self.window,)
        most = 0
        for w in windows:
            lower, upper = band(self.is_causal, w, self.causal_offset)
            if transpose:
                lower, upper = bands.transpose_band(lower, upper)
            most = max(most, bands.max_blocks(size, lower, upper, block, num))
        return most

    def kv_blocks(self, q_block, block_q: int, block_k: int, num_k: int):
        """Key blocks `[first, stop)` seen by query block `q_block`."""
        return bands.block_range(q_block * block_q, block_q, *self.band, block_k, num_k)

    def q_blocks(self, k_block, block_k: int, block_q: int, num_q: int):
        """Query blocks `[first, stop)` that see key block `k_block`."""
        return bands.block_range(k_block * block_k, block_k, *bands.transpose_band(*self.band), block_q, num_q)

    def max_kv_blocks(self, block_q: int, block_k: int, num_k: int) -> int:
        return bands.max_blocks(block_q, *self.band, block_k, num_k)

    def max_q_blocks(self, block_k: int, block_q: int, num_q: int) -> int:
        return bands.max_blocks(block_k, *bands.transpose_band(*self.band), block_q, num_q)


def is_per_head(window) -> bool:
    """Whether a `window` argument is a sequence of per-head windows rather than one `w` or `(left, right)`."""
    return isinstance(window, (tuple, list)) and any(w is None or isinstance(w, (tuple, list)) for w in window)


def band(is_causal: bool, window, offset):
    """Bounds `(lower, upper)` on `key_pos - query_pos` of the visible keys for one window and diagonal offset
    (ints, or int32 arrays for per-head windows and per-batch offsets); None: unbounded."""
    if window is None:
        return None, (offset if is_causal else None)
    left, right = window
    if is_causal:
        right = min(0, right) if isinstance(right, int) else jnp.minimum(0, right)
    return offset - left, offset + right


@dataclasses.dataclass(frozen=True)
class TileMask:
    """The position mask of one (batch, head): window, diagonal offset and key length (traced scalars where
    dynamic, the problem's static values otherwise; `kv_length` None: no padded keys to mask)."""
    window: tuple | None
    offset: object
    kv_length: object

    @classmethod
    def static(cls, problem: Problem, *, mask_kv_tail: bool) -> "TileMask":
        return cls(problem.window, problem.causal_offset, problem.kv_len if mask_kv_tail else None)


def logits(q, k, bias, q_seg, k_seg, q_start, k_start, problem: Problem, *, mask: TileMask,
           with_cap_derivative: bool = False):
    """Masked fp32 logits `[block_q, block_k]` of one tile (and, if asked and soft-capped, the derivative of the
    cap at each logit, which the backward multiplies into the gradient reaching q and k).

    q: `[block_q, H]`, k: `[block_k, H]`, bias: `[block_q, block_k]` or None; q_seg `[block_q, 1]` and k_seg
    `[1, block_k]` int32 or None; q_start/k_start: positions of the tile's first row/column.
    """
    s = softmax.soft_cap(lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                         * problem.scale, problem.logits_soft_cap)
    cap_derivative = None
    if with_cap_derivative and problem.logits_soft_cap is not None:
        cap_derivative = softmax.soft_cap_derivative(s, problem.logits_soft_cap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    keep = masks.position_mask(q_pos, k_pos, is_causal=problem.is_causal, window=mask.window,
                               causal_offset=mask.offset, kv_length=mask.kv_length)
    if q_seg is not None:
        keep = masks.combine(keep, q_seg == k_seg)
    s = softmax.masked_logits(s, keep)
    return (s, cap_derivative) if with_cap_derivative else s


def probabilities(s, lse):
    """`exp(s - lse)` with the saved row log-sum-exp `[block_q, 1]` (already finite: 0 for empty rows)."""
    return jnp.exp(s - lse)


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
    """fp32-accumulated `a @ b` with either operand transposed in place (no explicit transpose in the kernel)."""
    ca = 0 if transpose_a else 1
    cb = 1 if transpose_b else 0
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)
