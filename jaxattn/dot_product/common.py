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
    head_windows: tuple[tuple[int, int], ...] | None = None  # one (left, right) per query head (then window=None)
    logits_soft_cap: float | None = None  # cap * tanh(s / cap) on the scaled logits, before bias and masks
    block_shape: tuple[int, int] | None = None  # (bq, bk) of a `block_mask`


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


def cache_alignment(kv_lengths, q_len: int, kv_capacity: int):
    """`kv_lengths [B]` (valid keys per row of a padded cache) -> `(causal_offset, kv_length)`, each
    `[B, 1, 1, 1, 1]` for grouped logits: query `i` sits at key position `kv_lengths[b] - T + i` and keys
    `j >= kv_lengths[b]` are masked. None in, None out."""
    if kv_lengths is None:
        return None
    lengths = jnp.minimum(kv_lengths.astype(jnp.int32), kv_capacity).reshape(-1, 1, 1, 1, 1)
    return lengths - q_len, lengths


def spec_window(spec: MaskSpec, num_kv_heads: int):
    """The window `position_mask` takes for grouped logits: the single pair, or per-head `[K, G, 1, 1]` bounds."""
    if spec.head_windows is None:
        return spec.window
    return masks.window_bounds(spec.head_windows, (num_kv_heads, len(spec.head_windows) // num_kv_heads, 1, 1))


def position_mask(spec: MaskSpec, q_rows, k_cols, kv_length=None, *, num_kv_heads=1, alignment=None):
    """The position-derived mask of grouped logits from query positions `[..., rows, 1]` and key positions
    `[..., 1, keys]` (causal, single or per-head window, padded tail `kv_length`, cache `alignment` from
    `cache_alignment` or None); None when nothing is masked."""
    offset = spec.causal_offset
    if alignment is not None:
        offset, lengths = alignment
        kv_length = lengths if kv_length is None else jnp.minimum(lengths, kv_length)
    return masks.position_mask(q_rows, k_cols, is_causal=spec.is_causal, window=spec_window(spec, num_kv_heads),
                               causal_offset=offset, kv_length=kv_length)


def block_mask(spec: MaskSpec, q_pos, k_pos, kv_length, q_segment_ids, k_segment_ids, mask, *, num_kv_heads=1,
               alignment=None):
    """Mask for grouped logits `[B, K, G, T, keys]` of one key block; None when nothing is masked.

    `alignment`: `cache_alignment(kv_lengths, ...)` or None (then `spec.causal_offset` and `kv_length`)."""
    pos = position_mask(spec, q_pos[:, None], k_pos[None, :], kv_length, num_kv_heads=num_kv_heads,
                        alignment=alignment)
    seg = None
    if q_segment_ids is not None:
        seg = masks.segment_mask(q_segment_ids, k_segment_ids)[:, :, None]  # [B, 1, 1, T, keys]
    return masks.combine(pos, seg, mask)
