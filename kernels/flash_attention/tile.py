"""What every flash-attention tile computes, shared by the forward, dq and dk/dv kernel bodies.

A tile is `q[block_q, H] x k[block_k, H]^T`: fp32 logits, scaled, plus the bias tile, with masked entries at
`-inf` (the masks come from positions through `jaxattn.core.masks`, exactly as the reference builds them).
`Problem` is the static description of the masking; its bands give the blocks a tile row or column can see, so
blocks wholly outside the causal/window band are never visited.
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

    @classmethod
    def of(cls, q_len: int, kv_len: int, head_dim: int, *, scale=None, is_causal=False, window=None,
           causal_offset=None) -> "Problem":
        """From the op's arguments: default scale `head_dim ** -0.5`, default offset `S - T` (bottom-right)."""
        return cls(scale=float(head_dim ** -0.5 if scale is None else scale), q_len=q_len, kv_len=kv_len,
                   is_causal=bool(is_causal), window=masks.normalize_window(window),
                   causal_offset=kv_len - q_len if causal_offset is None else int(causal_offset))

    @property
    def band(self) -> tuple[int | None, int | None]:
        """Bounds on `key_pos - query_pos` of the visible keys (None: unbounded)."""
        off = self.causal_offset
        lower = None if self.window is None else off - self.window[0]
        if self.is_causal:
            upper = off if self.window is None else off + min(0, self.window[1])
        else:
            upper = None if self.window is None else off + self.window[1]
        return lower, upper

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


def logits(q, k, bias, q_seg, k_seg, q_start, k_start, problem: Problem, *, mask_kv_tail: bool):
    """Masked fp32 logits `[block_q, block_k]` of one tile.

    q: `[block_q, H]`, k: `[block_k, H]`, bias: `[block_q, block_k]` or None; q_seg `[block_q, 1]` and k_seg
    `[1, block_k]` int32 or None; q_start/k_start: positions of the tile's first row/column. `mask_kv_tail`
    masks the padded keys (positions >= kv_len).
    """
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * problem.scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    keep = masks.position_mask(q_pos, k_pos, is_causal=problem.is_causal, window=problem.window,
                               causal_offset=problem.causal_offset,
                               kv_length=problem.kv_len if mask_kv_tail else None)
    if q_seg is not None:
        keep = masks.combine(keep, q_seg == k_seg)
    return softmax.masked_logits(s, keep)


def probabilities(s, lse):
    """`exp(s - lse)` with the saved row log-sum-exp `[block_q, 1]` (already finite: 0 for empty rows)."""
    return jnp.exp(s - lse)


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
    """fp32-accumulated `a @ b` with either operand transposed in place (no explicit transpose in the kernel)."""
    ca = 0 if transpose_a else 1
    cb = 1 if transpose_b else 0
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)
