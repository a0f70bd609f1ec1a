"""Layout helpers shared by the reference and blocked paths of dot-product attention.

Internally queries are grouped for GQA: `[B, T, N, H] -> [B, T, K, G, H]` with `G = N // K`, and logits are
`[B, K, G, T, S]`, so k/v are never repeated in memory.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxattn.core import masks


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the position-derived masks (hashable: used as a jit/custom_vjp static arg)."""
    is_causal: bool = False
    window: tuple[int, int] | None = None
    causal_offset: int = 0  # S - T: bottom-right alignment


def group_queries(query, num_kv_heads):
    b, t, n, h = query.shape
    return query.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def ungroup_heads(x_bkgt_):
    """`[B, K, G, T, D]` -> `[B, T, N, D]`."""
    b, k, g, t, d = x_bkgt_.shape
    return jnp.moveaxis(x_bkgt_, 3, 1).reshape(b, t, k * g, d)


def grouped_bnts(x, num_kv_heads):
    """A 4-D `[b, n, t, s]` array (each dim 1 or full) -> `[b, K, G or 1, t, s]` matching grouped logits."""
    if x is None:
        return None
    b, n, t, s = x.shape
    if n == 1:
        return x.reshape(b, 1, 1, t, s)
    return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def as_4d(x):
    """Left-pads the rank of a bias or mask broadcastable to `[B, N, T, S]` to 4."""
    if x is None:
        return None
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def block_mask(spec: MaskSpec, q_pos, k_pos, kv_length, q_segment_ids, k_segment_ids, mask):
    """Mask for grouped logits `[B, K, G, T, keys]` of one key block; None when nothing is masked."""
    pos = masks.position_mask(
        q_pos[:, None], k_pos[None, :], is_causal=spec.is_causal, window=spec.window,
        causal_offset=spec.causal_offset, kv_length=kv_length,
    )
    seg = None
    if q_segment_ids is not None:
        seg = masks.segment_mask(q_segment_ids, k_segment_ids)[:, :, None]  # [B, 1, 1, T, keys]
    return masks.combine(pos, seg, mask)
