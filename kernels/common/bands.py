"""Block skipping for banded masks: which blocks of one axis a block of the other axis can see.

A banded mask lets row `i` see columns `j` with `lower <= j - i <= upper` (either bound may be None: unbounded).
Causal attention is `upper = offset`, a local window `(left, right)` is `[offset - left, offset + right]`.
The functions work on Python ints and on traced int32 scalars alike (they use `jnp.minimum`/`lax.div`, which lower
for Mosaic, Triton and the interpreter), so the same code picks loop bounds inside a kernel body and block indices
inside a BlockSpec index map.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _static(*xs) -> bool:
    return all(isinstance(x, int) for x in xs)


def _div(a, b: int):
    return a // b if _static(a) else lax.div(a, b)


def _clamp(x, lo, hi):
    return min(max(x, lo), hi) if _static(x) else jnp.minimum(jnp.maximum(x, lo), hi)


def block_range(start, size: int, lower: int | None, upper: int | None, block: int, num: int):
    """Blocks `[first, stop)` of the other axis (blocks of `block`, `num` of them) touched by the band of the rows
    `start .. start + size - 1`. `stop == first` when the band misses every block."""
    lo_pos = 0 if lower is None else start + lower
    hi_pos = num * block - 1 if upper is None else start + size - 1 + upper
    first = _div(_clamp(lo_pos, 0, num * block), block)
    stop = _div(_clamp(hi_pos + 1, 0, num * block) + block - 1, block)
    return first, (max(stop, first) if _static(stop, first) else jnp.maximum(stop, first))


def transpose_band(lower: int | None, upper: int | None):
    """The band seen from the columns: row `i` sees column `j` iff column `j` sees row `i` in the returned band."""
    return (None if upper is None else -upper), (None if lower is None else -lower)


def max_blocks(size: int, lower: int | None, upper: int | None, block: int, num: int) -> int:
    """Static bound on `stop - first` over all row blocks of `size` (the grid extent of a blocked reduction)."""
    if lower is None or upper is None:
        return num
    span = size + upper - lower  # positions touched by one row block
    return max(1, min(num, -(-span // block) + 1))


def step_block(first, stop, step, num: int):
    """Grid-mode block index of reduction step `step` over the range `[first, stop)`: steps past the end repeat the
    last block (so no new copy is issued) and the index always stays inside `[0, num)`."""
    last = jnp.maximum(stop - 1, first)
    return jnp.minimum(jnp.minimum(first + step, last), num - 1)
