"""Table-driven block walks of the flash kernels, for masks that make the visited blocks dynamic.

Per-head windows, per-batch key lengths (`kv_lengths`) and block-sparse masks change which key blocks a query tile
sees (and which query tiles a key block sees) per batch row, per head or per operand value, so the static band of
`tile.Problem` no longer describes them. `build` computes, in XLA before the kernels run, one flat int32 table:

  [left[N], right[N]]        per-head windows (if any)
  [offset[B], kv_length[B]]  per-batch diagonal offset and valid key length (if `kv_lengths`)
  count[Bt, Nt, tiles]       blocks visited by each tile of the walking side
  index[Bt, Nt, tiles, steps] their block indices, ascending, the last one repeated up to `steps`

`Bt` is 1 unless something varies per batch row, `Nt` 1 unless something varies per head; `steps` is the static
extent of the walk (the widest band, or every block under a block mask). On TPU the table is scalar-prefetched:
index maps fetch only the listed blocks, and steps past a tile's count repeat its last block (no new copy) and
skip the compute. The 'fori' walk loops over exactly `count` blocks. The tile's exact mask comes from the same
table (`Walk.tile_mask`); a block mask needs no element mask, since every kernel tile lies inside one mask block
(`check_block_shape`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxattn.core import block_sparse
from jaxattn.kernels.common import bands
from jaxattn.kernels.flash_attention import tile


@dataclasses.dataclass(frozen=True)
class Walk:
    """Where one kernel's walk reads the table (static: part of the kernel's closure)."""
    batch: int  # Bt
    heads: int  # Nt
    tiles: int  # tiles of the walking side
    steps: int  # static extent of the walk
    num_batch: int  # B
    num_heads: int  # N
    windows: bool
    lengths: bool

    @property
    def _counts_at(self) -> int:
        return 2 * self.num_heads * self.windows + 2 * self.num_batch * self.lengths

    def _row(self, b, n, t):
        b = b if self.batch > 1 else 0
        n = n if self.heads > 1 else 0
        return (b * self.heads + n) * self.tiles + t

    def count(self, table, b, n, t):
        """Blocks visited by tile `t` of batch row `b`, (query) head `n`."""
        return table[self._counts_at + self._row(b, n, t)]

    def block(self, table, b, n, t, r):
        """Block index of step `r < steps` of that walk."""
        at = self._counts_at + self.batch * self.heads * self.tiles
        return table[at + self._row(b, n, t) * self.steps + r]

    def constexprs(self) -> dict:
        """The Triton kernels' compile-time constants of this walk (`triton_kernels._walk_*` read the table)."""
        return dict(W_BATCH=self.batch, W_HEADS=self.heads, W_TILES=self.tiles, W_STEPS=self.steps,
                    W_COUNTS=self._counts_at, HAS_WINDOWS=self.windows, HAS_LENGTHS=self.lengths, NB=self.num_batch)

    def tile_mask(self, table, problem: tile.Problem, b, n) -> tile.TileMask:
        """The position mask of batch row `b`, query head `n` (the key length is always masked: padded keys lie
        past it)."""
        window = problem.window
        if self.windows:
            window = (table[n], table[self.num_heads + n])
        offset, kv_length = problem.causal_offset, problem.kv_len
        if self.lengths:
            at = 2 * self.num_heads * self.windows
            offset, kv_length = table[at + b], table[at + self.num_batch + b]
        return tile.TileMask(window, offset, kv_length)


def check_block_shape(block_shape, q_len: int, kv_len: int, block_q: int, block_k: int, target: str) -> None:
    """Each kernel tile must lie inside one block of the mask (then skipping blocks is the whole mask); on TPU a
    key tile must also fill whole 128-lane vregs."""
    if target == "tpu" and block_k % 128 and block_k < kv_len:
        raise ValueError(f"`block_shape` {tuple(block_shape)}: on TPU the key blocks of a block mask must be "
                         f"multiples of 128 (the kernel's key tile would be {block_k})")
    for name, length, mask_block, kernel_block in (("query", q_len, block_shape[0], block_q),
                                                   ("key", kv_len, block_shape[1], block_k)):
        if -(-length // mask_block) > 1 and mask_block % kernel_block:
            raise ValueError(f"`block_shape` {tuple(block_shape)}: the kernel's {name} tile {kernel_block} does not "
                             f"divide the mask's {name} block {mask_block}")


def preferred_block(default: int, mask_block: int) -> int:
    """The largest power-of-two divisor of `mask_block` no larger than `default` (the tile a block mask allows)."""
    block = 1
    while block * 2 <= default and mask_block % (block * 2) == 0:
        block *= 2
    return block


def _kernel_block_mask(block_mask, problem: tile.Problem, block_q: int, block_k: int, num_q: int, num_k: int):
    """`[Bm, Nm, num_q, num_k]` bool: the mask block holding each kernel tile (padding tiles take the last)."""
    bq, bk = problem.block_shape
    rows = np.minimum(np.arange(num_q) * block_q // bq, block_mask.shape[2] - 1)
    cols = np.minimum(np.arange(num_k) * block_k // bk, block_mask.shape[3] - 1)
    return block_mask[:, :, rows][:, :, :, cols]


def build(problem: tile.Problem, *, batch: int, heads: int, kv_lengths, block_mask, block_q: int, block_k: int,
          num_q: int, num_k: int, key_major: bool = False):
    """`(Walk, table)` of the query-major walk (forward, dq: each query tile's key blocks) or, `key_major`, of the
    dk/dv walk (each key block's query tiles, per query head)."""
    windows = problem.head_windows is not None
    lengths = kv_lengths is not None
    parts = []
    window = problem.window
    if windows:
        left, right = (np.asarray(x, np.int32) for x in zip(*problem.head_windows))
        parts += [jnp.asarray(left), jnp.asarray(right)]
        window = (jnp.asarray(left)[None, :, None], jnp.asarray(right)[None, :, None])  # [1, N, 1]
    offset = problem.causal_offset
    if lengths:
        kv_lengths = kv_lengths.astype(jnp.int32)
        offset = problem.causal_offset + kv_lengths - problem.kv_len
        parts += [offset, kv_lengths]
        offset = offset[:, None, None]  # [B, 1, 1]
    lower, upper = tile.band(problem.is_causal, window, offset)
    walking, other = (np.arange(num_k), np.arange(num_q)) if key_major else (np.arange(num_q), np.arange(num_k))
    if key_major:
        first, stop = bands.block_range(jnp.asarray(walking * block_k), block_k,
                                        *bands.transpose_band(lower, upper), block_q, num_q)
        if lengths:  # key blocks past the length are seen by no query
            stop = jnp.where(walking * block_k < kv_lengths[:, None, None], stop, first)
    else:
        first, stop = bands.block_range(jnp.asarray(walking * block_q), block_q, lower, upper, block_k, num_k)
        if lengths:
            stop = jnp.minimum(stop, -(-kv_lengths[:, None, None] // block_k))
    first, stop = jnp.asarray(first)[..., None], jnp.asarray(stop)[..., None]
    visible = (other >= first) & (other < stop)  # [Bt?, Nt?, tiles, other] (leading axes may be missing)
    visible = visible.reshape((1,) * (4 - visible.ndim) + visible.shape)
    if block_mask is not None:
        kernel_mask = _kernel_block_mask(block_mask, problem, block_q, block_k, num_q, num_k)
        visible = visible & (jnp.swapaxes(kernel_mask, 2, 3) if key_major else kernel_mask)
    walk = layout(problem, batch=batch, heads=heads, block_mask_shape=None if block_mask is None else block_mask.shape,
                  block_q=block_q, block_k=block_k, num_q=num_q, num_k=num_k, key_major=key_major)
    visible = jnp.broadcast_to(visible, (walk.batch, walk.heads, *visible.shape[2:]))
    order, count = block_sparse.visit_lists(visible)  # visible blocks first, ascending
    r = jnp.minimum(jnp.arange(walk.steps, dtype=jnp.int32), jnp.maximum(count - 1, 0)[..., None])
    index = jnp.take_along_axis(order, r, axis=-1)
    parts += [count.reshape(-1), index.reshape(-1)]
    return walk, jnp.concatenate([jnp.asarray(p, jnp.int32).reshape(-1) for p in parts])


def layout(problem: tile.Problem, *, batch: int, heads: int, block_mask_shape, block_q: int, block_k: int,
           num_q: int, num_k: int, key_major: bool = False) -> Walk:
    """The `Walk` that `build` returns, from shapes alone (what a compiled kernel's constants depend on)."""
    per_batch = problem.kv_lengths or (block_mask_shape is not None and block_mask_shape[0] > 1)
    per_head = problem.head_windows is not None or (block_mask_shape is not None and block_mask_shape[1] > 1)
    num_other = num_q if key_major else num_k
    if block_mask_shape is not None:
        steps = num_other
    else:
        steps = problem.max_band_blocks(block_k if key_major else block_q, block_q if key_major else block_k,
                                        num_other, transpose=key_major)
    return Walk(batch=batch if per_batch else 1, heads=heads if per_head else 1, tiles=num_k if key_major else num_q,
                steps=max(1, steps), num_batch=batch, num_heads=heads, windows=problem.head_windows is not None,
                lengths=problem.kv_lengths)


def fit_to_block_shape(sizes, block_shape):
    """Tile sizes no larger than `sizes` that divide a block mask's `(bq, bk)` (powers of two)."""
    bq, bk = block_shape
    q = [preferred_block(x, bq) for x in sizes.q_blocks]
    k = [preferred_block(x, bk) for x in sizes.k_blocks]
    return type(sizes)(q[0], k[0], q[1], k[1], q[2], k[2])
