"""Zigzag chunk order: causal load balance for sequence-sharded attention.

The sequence is cut into `2n` chunks for `n` devices; device `i` holds chunks `i` and `2n - 1 - i` (one early, one
late), so under a causal mask every device has the same amount of work. Two forms:
- global: `zigzag_permute` / `zigzag_unpermute` reorder a whole array (for a data pipeline that permutes tokens
  and positions once; the model then runs in zigzag order);
- per device, inside `shard_map`: `to_zigzag_local` / `from_zigzag_local` move the chunks with four partial
  `ppermute`s, each device sending its shard once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def zigzag_order(num_shards: int) -> np.ndarray:
    """Chunk indices in zigzag order: `[0, 2n-1, 1, 2n-2, ...]` (device `i` gets positions `2i, 2i+1`)."""
    n = num_shards
    return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def _check(x, axis, num_shards):
    if num_shards < 1:
        raise ValueError(f"`num_shards` must be >= 1, got {num_shards}")
    if x.shape[axis] % (2 * num_shards):
        raise ValueError(f"`x` axis {axis} ({x.shape[axis]}, shape {tuple(x.shape)}) must be divisible by "
                         f"2 * num_shards ({2 * num_shards}) for the zigzag order")


def _reorder_chunks(x, axis, num_chunks, order):
    axis = axis % x.ndim
    shape = x.shape
    chunks = x.reshape(shape[:axis] + (num_chunks, shape[axis] // num_chunks) + shape[axis + 1:])
    return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(shape)


def zigzag_permute(x, num_shards: int, axis: int = 1):
    """Natural order -> zigzag order along `axis` (length divisible by `2 * num_shards`)."""
    _check(x, axis, num_shards)
    return _reorder_chunks(x, axis, 2 * num_shards, zigzag_order(num_shards))


def zigzag_unpermute(x, num_shards: int, axis: int = 1):
    """Zigzag order -> natural order along `axis`; inverse of `zigzag_permute`."""
    _check(x, axis, num_shards)
    return _reorder_chunks(x, axis, 2 * num_shards, np.argsort(zigzag_order(num_shards)))


def _moves(n: int):
    """(natural half h, zigzag slot s, device pairs): natural chunk 2d+h of device d is zigzag slot s of its target."""
    moves = []
    for h in (0, 1):
        early = [(d, 2 * d + h) for d in range(n) if 2 * d + h < n]
        late = [(d, 2 * n - 1 - (2 * d + h)) for d in range(n) if 2 * d + h >= n]
        moves += [(h, 0, early), (h, 1, late)]
    return [m for m in moves if m[2]]


def _move_halves(x, axis_name, axis, inverse):
    n = jax.lax.axis_size(axis_name)
    parts = jnp.split(x, 2, axis=axis)
    out = [jnp.zeros_like(parts[0]), jnp.zeros_like(parts[1])]
    for h, s, pairs in _moves(n):
        src, dst, perm = (s, h, [(b, a) for a, b in pairs]) if inverse else (h, s, pairs)
        # Devices outside `perm` receive zeros, so adding the (at most two) incoming pieces is exact.
        out[dst] = out[dst] + jax.lax.ppermute(parts[src], axis_name, perm)
    return jnp.concatenate(out, axis=axis)


def to_zigzag_local(x, axis_name: str, axis: int = 1):
    """Per-device (inside `shard_map`): this device's natural-order shard -> its zigzag-order shard."""
    return _move_halves(x, axis_name, axis, inverse=False)


def from_zigzag_local(x, axis_name: str, axis: int = 1):
    """Per-device: zigzag-order shard -> natural-order shard; inverse of `to_zigzag_local`."""
    return _move_halves(x, axis_name, axis, inverse=True)


def chunk_ids(axis_name: str):
    """Global chunk indices (out of `2n`) of this device's two zigzag halves, as traced int32 scalars."""
    n = jax.lax.axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    return r, 2 * n - 1 - r
