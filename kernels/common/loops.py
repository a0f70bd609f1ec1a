"""One kernel body, two ways of walking its reduction axis (the key blocks of attention, for instance).

- 'fori': the operands indexed by the reduction are whole blocks in the kernel and a `lax.fori_loop` slices one
  tile per step; the running state lives in loop carries. This is what the Pallas-Triton lowering needs (grid
  programs are independent there), and the loop bounds are dynamic, so skipped blocks cost nothing.
- 'grid': the reduction is the last grid axis ('arbitrary' on TPU); BlockSpecs bring one tile per step (Mosaic
  double-buffers the copies) and the state lives in VMEM scratch. Operands never have to fit in VMEM whole.
  Steps past the end of a row's range re-map to its last block (no new copy) and skip the compute.

A kernel written against `Reduction` states its tiles once: `tile(ref, fori_index)` and `store(ref, fori_index,
value)` take the slice used in 'fori' mode and ignore it in 'grid' mode, where the BlockSpec already selected it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from jax.experimental import pallas as pl

MODES = ("fori", "grid")


@dataclasses.dataclass(frozen=True)
class Reduction:
    mode: str
    steps: int = 1  # 'grid' mode: the static extent of the reduction grid axis
    axis: int = 0  # 'grid' mode: its position (the number of grid axes before it)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"reduction `mode` must be one of {MODES}, got {self.mode!r}")

    @property
    def on_grid(self) -> bool:
        return self.mode == "grid"

    def grid(self, base: tuple[int, ...]) -> tuple[int, ...]:
        if self.on_grid and len(base) != self.axis:
            raise ValueError(f"grid mode expects {self.axis} base grid axes, got {base}")
        return (*base, self.steps) if self.on_grid else tuple(base)

    def semantics(self, base: tuple[str, ...]) -> tuple[str, ...]:
        return (*base, "arbitrary") if self.on_grid else tuple(base)

    def spec(self, block_shape, index_map: Callable) -> pl.BlockSpec:
        """BlockSpec of an operand that does not follow the reduction: `index_map(*base_ids, *prefetch)`
        (`prefetch`: the scalar-prefetch refs of a `PrefetchScalarGridSpec`, if any)."""
        if self.on_grid:
            return pl.BlockSpec(block_shape, lambda *ids: index_map(*ids[:self.axis], *ids[self.axis + 1:]))
        return pl.BlockSpec(block_shape, index_map)

    def reduced_spec(self, fori: tuple, grid: tuple, step_index: Callable | None = None) -> pl.BlockSpec:
        """BlockSpec of an operand that follows the reduction.

        fori: `(block_shape, index_map(*base_ids))`, a block holding every tile the loop may visit;
        grid: `(block_shape, index_map(*base_ids, *r))` for one tile, with `r = step_index(*base_ids, step,
        *prefetch)` (a block index or a tuple of them; `prefetch` as in `spec`).
        """
        if not self.on_grid:
            return pl.BlockSpec(*fori)
        shape, index_map = grid

        def grid_index_map(*ids):
            base, step, prefetch = ids[:self.axis], ids[self.axis], ids[self.axis + 1:]
            r = step_index(*base, step, *prefetch)
            return index_map(*base, *(r if isinstance(r, tuple) else (r,)))

        return pl.BlockSpec(shape, grid_index_map)

    def scratch_shapes(self, carry_shapes) -> list:
        """VMEM scratch holding the carry between grid steps (`carry_shapes`: a list of `ShapeDtypeStruct`)."""
        if not self.on_grid:
            return []
        from jax.experimental.pallas import tpu as pltpu
        return [pltpu.VMEM(_scratch_shape(s.shape), s.dtype) for s in carry_shapes]

    def tile(self, ref, fori_index):
        return ref[...] if self.on_grid else ref[fori_index]

    def store(self, ref, fori_index, value) -> None:
        if self.on_grid:
            ref[...] = value.astype(ref.dtype)
        else:
            ref[fori_index] = value.astype(ref.dtype)

    def run(self, init: Callable, step: Callable, finish: Callable, *, start, count, scratch=(),
            valid: Callable | None = None) -> None:
        """`finish(step(r_last, ... step(start, init())))` over `r in [start, start + count)`.

        init() -> carry (a list of arrays); step(r, carry) -> carry; finish(carry) writes the outputs. In 'grid'
        mode the reduction is grid axis `axis` (the last), `scratch` are the refs from `scratch_shapes`, and step
        `j` runs when `valid(start + j)` (default: `j < count`, with `count` at most `steps`).
        """
        if not self.on_grid:
            finish(jax.lax.fori_loop(start, start + count, step, init()))
            return
        shapes = [s.shape for s in jax.eval_shape(init)]
        j = pl.program_id(self.axis)

        def read():
            return [ref[...].reshape(s) for ref, s in zip(scratch, shapes)]

        def write(carry):
            for ref, x in zip(scratch, carry):
                ref[...] = x.reshape(ref.shape).astype(ref.dtype)

        @pl.when(j == 0)
        def _init():
            write(init())

        @pl.when(j < count if valid is None else valid(start + j))
        def _step():
            write(step(start + j, read()))

        @pl.when(j == self.steps - 1)
        def _finish():
            finish(read())


def _scratch_shape(shape):
    """Scratch keeps at least two dimensions (Mosaic tiles the two minor ones); 1-D carries become columns."""
    return tuple(shape) if len(shape) >= 2 else (*shape, 1)
