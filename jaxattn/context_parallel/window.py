"""Local windows (`local_window_size`) for sequence-sharded softmax attention: only the keys the window reaches.

Device `r` of `n` holds the contiguous positions `[rL, (r+1)L)`. Under a window `-left <= j - i <= right` (with
`is_causal`, `right = 0`) its queries read keys of `[rL - left, (r+1)L + right)` only: the `left` tokens before
the shard, its own `L`, the `right` tokens after it. So instead of `n` ring steps each device receives exactly
those `left + right` border tokens (`exchange_borders`: one `ppermute` per neighbour the window reaches, each
sending only the slice that is read; `ceil(left / L)` of them backwards, `ceil(right / L)` forwards) and runs
the single-device op once on `[left halo | own | right halo]` (`attend_with_halo`). Traffic per device is
`(left + right)` tokens of K/V, work `L x (L + left + right)` under the op's window: neither grows with `T`.
Gradients are autodiff: a `ppermute`'s transpose is the reverse `ppermute` of the same border.

The op aligns windows bottom-right (`j - (i + S - T)`), so with `hl` halo keys before and `hr` after, `hr` zero
query rows are appended (their outputs are dropped): the query `i` then sits at key `i + hl`, its own token.
Keys before position 0 or after `T` (the shards missing at the sequence ends) arrive as zeros and are masked
with segment ids (a query's id differs from theirs: the minimum of the shard's query ids minus one, so user
segment ids must not be the integer dtype's minimum).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.dot_product.api import dot_product_attention


def window_band(local_window_size, is_causal: bool, length: int) -> tuple[int, int]:
    """`(left, right)`: query `i` sees the keys `j` with `-left <= j - i <= right` (global positions), each side
    at most `length - 1`; `right = 0` when causal. `ValueError` on a negative or non-integer window."""
    size = local_window_size
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in pair):
        raise ValueError(f"`local_window_size` must be a non-negative int or a (left, right) pair of non-negative "
                         f"ints, got {local_window_size!r}")
    left, right = pair
    return min(left, length - 1), 0 if is_causal else min(right, length - 1)


def exchange_borders(arrays, axis: int, left: int, right: int, axis_name: str):
    """Each `x` of `arrays` (this device's shard, all of one length along `axis`) as
    `[the `left` positions before the shard | x | the `right` positions after it]` along `axis`, gathered from as
    many neighbours as they span (each sends only the slice read); zeros where there is no device (before the
    first shard, after the last). `left`, `right` <= `(n - 1) * shard`."""
    n = jax.lax.axis_size(axis_name)
    length = arrays[0].shape[axis]

    def receive(shift, start, stop):  # from device `r - shift` (shift > 0) or `r + |shift|`, its [start, stop)
        perm = [(j, j + shift) for j in range(n - shift)] if shift > 0 else [(j - shift, j) for j in range(n + shift)]
        return jax.lax.ppermute([jax.lax.slice_in_dim(x, start, stop, axis=axis) for x in arrays], axis_name, perm)

    pieces = [[] for _ in arrays]
    for s in range(-(-left // length), 0, -1):  # the farthest previous device first
        for acc, part in zip(pieces, receive(s, max(s * length - left, 0), length)):
            acc.append(part)
    for acc, x in zip(pieces, arrays):
        acc.append(x)
    for s in range(1, -(-right // length) + 1):
        for acc, part in zip(pieces, receive(-s, 0, min(length, right - (s - 1) * length))):
            acc.append(part)
    return [jnp.concatenate(p, axis) if len(p) > 1 else p[0] for p in pieces]


def halo_sizes(band: tuple[int, int], shard: int, n: int) -> tuple[int, int]:
    """The `(before, after)` key tokens a shard's window reads outside it (at most the other shards)."""
    return min(band[0], (n - 1) * shard), min(band[1], (n - 1) * shard)


def attend_with_halo(query, key_ext, value_ext, query_ids, key_ids_ext, *, band, halo, axis_name, scale,
                     implementation, sinks=None, logits_soft_cap=None):
    """The op on this device's `query [b, L, N, H]` against `key_ext`/`value_ext [b, hl + L + hr, K, H]`
    (`exchange_borders`' layout, `halo = (hl, hr)`) under the global `band`; segment ids optional
    (`query_ids [b, L]`, `key_ids_ext [b, hl + L + hr]`); `sinks`, `logits_soft_cap` go to the op. Returns
    `[b, L, N, Hv]`."""
    hl, hr = halo
    b, length = query.shape[:2]
    n, r = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    position = r * length - hl + jnp.arange(hl + length + hr)
    real = (position >= 0) & (position < n * length)  # False: a missing shard's zeros
    if query_ids is None:
        query_ids = jnp.zeros((b, length), jnp.int32)
        key_ids_ext = jnp.broadcast_to(jnp.where(real, 0, 1).astype(jnp.int32), (b, hl + length + hr))
    else:
        missing = jnp.min(query_ids, axis=1, keepdims=True) - 1  # an id no query of the shard has
        key_ids_ext = jnp.where(real[None], key_ids_ext, missing.astype(key_ids_ext.dtype))
    if hr:
        query = jnp.pad(query, ((0, 0), (0, hr), (0, 0), (0, 0)))
        query_ids = jnp.pad(query_ids, ((0, 0), (0, hr)))
    out = dot_product_attention(query, key_ext, value_ext, scale=scale, local_window_size=band,
                                query_segment_ids=query_ids, key_segment_ids=key_ids_ext, sinks=sinks,
                                logits_soft_cap=logits_soft_cap, implementation=implementation)
    return out[:, :length]
