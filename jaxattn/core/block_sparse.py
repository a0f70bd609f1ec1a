"""Block-sparse attention masks (splash attention's MaskInfo, MoBA, Radial attention): the shared semantics.

A block mask is boolean `[B|1, N|1, ceil(T / bq), ceil(S / bk)]` with `block_shape = (bq, bk)`: query `i` may
see key `j` only if `block_mask[b, n, i // bq, j // bk]` (and every other mask agrees). The op's XLA path, the
kernels and context parallelism all use these functions, so they agree on the geometry and on the order in which
the visited key blocks of a query block are listed.
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def grid_shape(q_len: int, kv_len: int, block_shape) -> tuple[int, int]:
    """`(ceil(T / bq), ceil(S / bk))`: the block grid of a `T x S` attention."""
    bq, bk = block_shape
    return math.ceil(q_len / bq), math.ceil(kv_len / bk)


def check_block_shape(block_shape) -> tuple[int, int]:
    """`block_shape` must be a pair of positive ints; returns it as a tuple."""
    ok = (isinstance(block_shape, (tuple, list)) and len(block_shape) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in block_shape))
    if not ok:
        raise ValueError(f"`block_shape` must be a (query_block, key_block) pair of positive ints, got "
                         f"{block_shape!r}")
    return int(block_shape[0]), int(block_shape[1])


def check_block_mask(block_mask, block_shape, batch: int, num_heads: int, q_len: int, kv_len: int):
    """Validates `block_mask` against `block_shape` and the attention's shape; returns `block_shape` as a tuple.

    Raises ValueError naming `block_mask` / `block_shape` and the shapes when the dtype is not boolean, the rank
    is not 4, the batch / head dims are neither 1 nor full, or the block grid does not match `T`, `S`.
    """
    if block_shape is None:
        raise ValueError("`block_mask` needs `block_shape=(query_block, key_block)`")
    block_shape = check_block_shape(block_shape)
    shape = tuple(block_mask.shape)
    if block_mask.dtype != jnp.bool_:
        raise ValueError(f"`block_mask` must be boolean (True: the block is visited), got dtype {block_mask.dtype}")
    grid = grid_shape(q_len, kv_len, block_shape)
    want = f"[B|1, N|1, ceil(T/bq), ceil(S/bk)] = [{batch}|1, {num_heads}|1, {grid[0]}, {grid[1]}]"
    if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, num_heads) or shape[2:] != grid:
        raise ValueError(f"`block_mask` of shape {shape} does not match {want} for T={q_len}, S={kv_len} and "
                         f"block_shape={block_shape}")
    return block_shape


def expand(block_mask, block_shape, q_len: int, kv_len: int):
    """The dense `[B|1, N|1, T, S]` mask of a block mask. For references and tests only: it is `T x S`."""
    bq, bk = block_shape
    dense = jnp.repeat(jnp.repeat(block_mask, bq, axis=2), bk, axis=3)
    return dense[:, :, :q_len, :kv_len]


def rows_of_key_block(block_mask, block_shape, q_pos, key_block):
    """`[..., rows]` (e.g. `[B|1, N|1, rows]`): whether each query position in `q_pos` may see key block `key_block` (a scalar)."""
    bq = block_shape[0]
    column = jnp.take(block_mask, key_block, axis=-1)  # [..., nq]
    return jnp.take(column, q_pos // bq, axis=-1, mode="clip")


def visit_lists(block_mask):
    """The key blocks each query block visits, as scalar-prefetchable tables (splash attention's `data_next`).

    Returns `(indices, counts)`: `indices [..., nq, nk]` int32 lists, per query block, the key blocks whose mask is
    True in ascending order, then the False ones (never to be visited: iterate `i < counts`); `counts [..., nq]`
    int32 is the number of True blocks. Works on traced masks (the lists are data, the shapes static).
    """
    # A stable sort on "is False" puts the True blocks first and keeps both groups in ascending order.
    order = jnp.argsort(jnp.logical_not(block_mask).astype(jnp.int32), axis=-1, stable=True)
    counts = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
    return order.astype(jnp.int32), counts


def density(block_mask) -> float:
    """The fraction of True blocks (what the work of a block-skipping path scales with)."""
    return float(jnp.mean(block_mask.astype(jnp.float32)))
