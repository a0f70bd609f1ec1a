"""Splitting a sequence axis into fixed-size blocks for `lax.scan` (padding the tail block)."""
from __future__ import annotations

import math

import jax.numpy as jnp


def num_blocks(length: int, block: int) -> int:
    return math.ceil(length / block)


def pad_axis(x, axis: int, target: int, value=0):
    """Pads `axis` of `x` at the end up to `target` with `value`."""
    extra = target - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def split_blocks(x, axis: int, block: int, value=0, *, broadcast_ones: bool = False):
    """`x` with `axis` of length L -> blocks stacked on a new leading axis: `[ceil(L/block), ..., block, ...]`.

    With `broadcast_ones` an axis of length 1 is a broadcast axis (e.g. of a bias) and is not split: returns None so
    the caller passes the array whole. None in, None out.
    """
    if x is None or (broadcast_ones and x.shape[axis] == 1):
        return None
    axis = axis % x.ndim
    nb = num_blocks(x.shape[axis], block)
    x = pad_axis(x, axis, nb * block, value)
    x = x.reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def merge_blocks(x, axis: int, length: int):
    """Inverse of `split_blocks`: `[nb, ..., block, ...]` -> `[..., length, ...]` (drops the padding)."""
    axis = axis % (x.ndim - 1)
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])
    return jnp.take(x, jnp.arange(length), axis=axis) if x.shape[axis] != length else x
