"""Attention masks computed from token positions, so every path (reference, blocked XLA, kernel tile) builds
exactly the same mask for the positions it holds instead of slicing a materialised `T x S` array.
"""
from __future__ import annotations

import jax.numpy as jnp


def normalize_window(local_window_size):
    """`None`, an int `w` (symmetric `(w, w)`) or `(left, right)` -> `None` or a tuple of two ints."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, int):
        left = right = local_window_size
    else:
        left, right = local_window_size
    return int(left), int(right)


def position_mask(q_pos, k_pos, *, is_causal=False, window=None, causal_offset=0, kv_length=None):
    """Boolean mask `[..., rows, keys]` from query positions `[..., rows, 1]` and key positions `[..., 1, keys]`.

    Causal masks and windows are aligned bottom-right: query `i` sits at key position `i + causal_offset`,
    with `causal_offset = S - T` (FlashAttention >= 2.1 convention). `kv_length` masks padded keys.
    """
    mask = None

    def both(a, b):
        return b if a is None else a & b

    rel = k_pos - (q_pos + causal_offset)
    if is_causal:
        mask = both(mask, rel <= 0)
    if window is not None:
        left, right = window
        mask = both(mask, (rel >= -left) & (rel <= right))
    if kv_length is not None:
        mask = both(mask, k_pos < kv_length)
    return mask


def segment_mask(q_segment_ids, k_segment_ids):
    """`[B, T]` and `[B, S]` ids -> `[B, 1, T, S]`: a query sees only keys of its own segment."""
    return (q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :])


def combine(*masks):
    """Logical AND of the masks that are not None (None if all are)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else jnp.logical_and(out, m)
    return out


def per_head_windows(windows, num_heads: int, q_len: int, kv_len: int):
    """Per-head sliding windows (MoA, S2-Attention): a sequence of `num_heads` entries, each `(left, right)`
    non-negative ints or None (a global head) -> a tuple of `(left, right)` int pairs, None standing for a
    window wide enough to see every key (`q_len + kv_len` each side). Raises ValueError naming
    `local_window_size` for a wrong length or entry."""
    windows = tuple(windows)
    if len(windows) != num_heads:
        raise ValueError(f"a per-head `local_window_size` needs one (left, right) pair per query head: got "
                         f"{len(windows)} for {num_heads} heads")
    wide = q_len + kv_len
    out = []
    for i, w in enumerate(windows):
        if w is None:
            out.append((wide, wide))
            continue
        ok = (isinstance(w, (tuple, list)) and len(w) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in w))
        if not ok:
            raise ValueError(f"`local_window_size[{i}]` must be None or a (left, right) pair of non-negative "
                             f"ints, got {w!r}")
        out.append((int(w[0]), int(w[1])))
    return tuple(out)


def window_bounds(head_windows, lead_shape):
    """`(left, right)` int32 arrays reshaped to `lead_shape` (e.g. `(K, G, 1, 1)` for grouped logits) from the
    tuple of per-head pairs; `position_mask(window=...)` takes them like a single pair."""
    left = jnp.asarray([w[0] for w in head_windows], jnp.int32).reshape(lead_shape)
    right = jnp.asarray([w[1] for w in head_windows], jnp.int32).reshape(lead_shape)
    return left, right
