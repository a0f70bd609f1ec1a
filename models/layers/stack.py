"""`Stack`: `n` blocks of one structure applied in order, scanned over stacked parameters or unrolled.

Scanned (`scan=True`), the blocks are built once under `nnx.vmap`: every variable gets a leading axis of size `n`
named `LAYERS` in its logical names, and `jax.lax.scan` compiles one block whatever `n` is.
Unrolled (`scan=False`), `blocks` is an `nnx.List` of `n` separate blocks (names `blocks/0/...`), which is what a
per-layer checkpoint or a reference state dict looks like; `stacked_to_blocks` / `blocks_to_stacked` convert a
stack's state between the two layouts. Either way each block runs under the remat policy `remat`
(`models/layers/remat.py`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models.layers.axes import LAYERS, constrain, logical_names
from jaxattn.models.layers.remat import check_remat, checkpoint

_AXIS_NAME = {nnx.PARTITION_NAME: LAYERS}


class Stack(nnx.Module):
    """`n` blocks made by `make_block(rngs, *args_i)` (which must build the same structure on every call).

    `block_args`: sequences of length `n` whose `i`-th items are block `i`'s constructor arguments (per-block
    drop-path rates, say). Unrolled, block `i` gets the items as they are (Python floats stay static); scanned, each
    sequence becomes an array and block construction sees one traced item, so anything built from it must hold
    it as data (`DropPath` stores a traced rate as a `DropRate` variable, sliced per block by the scan).

    `stack(x, *shared)` runs `x = block(x, *shared)` through the blocks; `stack.apply(fn, x, per_block, *shared)`
    runs `x, out = fn(block, x, per_block[i], *shared)` and returns `(x, outs)` with `outs` stacked on a leading
    axis of size `n` (for decoding caches and other per-block inputs and outputs; `per_block` leaves have that
    leading axis, or `per_block` is None). Blocks may update their non-parameter state (statistics, RNG counts).

    The blocks run functionally (split into arrays, `jax.lax.scan` / a loop over `jax.checkpoint`ed steps, merged
    back inside), so a model closed over by `jax.jit` works like one passed in.
    """

    def __init__(self, make_block: Callable[..., nnx.Module], n: int, *, rngs: nnx.Rngs, scan: bool = True,
                 remat: str = "none", block_args: tuple = ()):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"`n` (blocks in a stack) must be a positive int, got {n!r}")
        self.n, self.scan, self.remat = int(n), bool(scan), check_remat(remat)
        for j, arg in enumerate(block_args):
            if len(arg) != self.n:
                raise ValueError(f"`block_args[{j}]` must hold one item per block ({self.n}), got {len(arg)}")
        if self.scan:
            self.blocks = nnx.vmap(make_block, in_axes=0, out_axes=0, transform_metadata=_AXIS_NAME)(
                rngs.split(self.n), *(jnp.asarray(arg) for arg in block_args))
        else:
            self.blocks = nnx.List([make_block(rngs, *(arg[i] for arg in block_args)) for i in range(self.n)])

    @property
    def template(self) -> nnx.Module:
        """A block whose static attributes (sizes, options) are those of every block; its arrays, when
        scanned, keep the stacking axis."""
        return self.blocks if self.scan else self.blocks[0]

    def __call__(self, x, *shared):
        x, _ = self.apply(_plain_block, x, None, *shared)
        return x

    def apply(self, fn: Callable, x, per_block: Any = None, *shared):
        """`x, out_i = fn(block_i, x, per_block_i, *shared)` for `i` in order; returns `(x, stacked outs)`."""
        if self.scan:
            graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
            step = _step(fn, graphdef, shared, self.remat, prevent_cse=False, stacked=True)

            def body(carry, xs):
                carry, out, new_rest = step(carry, *xs)
                return carry, (out, new_rest)
            x, (outs, rest) = jax.lax.scan(body, x, (params, rest, per_block))
            _update(self.blocks, rest)
            return x, outs
        outs = []
        for i, block in enumerate(self.blocks):
            graphdef, params, rest = nnx.split(block, nnx.Param, ...)
            step = _step(fn, graphdef, shared, self.remat, prevent_cse=True, stacked=False)
            x, out, rest = step(x, params, rest, jax.tree.map(lambda a: a[i], per_block))
            _update(block, rest)
            outs.append(out)
        return x, jax.tree.map(lambda *o: jnp.stack(o), *outs)


def _step(fn, graphdef, shared, remat: str, *, prevent_cse: bool, stacked: bool):
    """`(x, params, rest, per_block) -> (x, out, rest')`: one block merged from its arrays, under `remat`.

    Each parameter is constrained to its logical sharding (the stacking axis dropped from a scan's slices): so
    inside the loop an FSDP-split weight is gathered where it is used, and its gradient is reduce-scattered back
    onto its shards instead of all-reduced whole.
    """
    def step(x, params, rest, per_block):
        params = jax.tree.map(lambda v: _constrained(v, stacked), params,
                              is_leaf=lambda v: isinstance(v, nnx.Variable))
        block = nnx.merge(graphdef, params, rest)
        x, out = fn(block, x, per_block, *shared)
        return x, out, nnx.state(block, nnx.Not(nnx.Param))
    return checkpoint(step, remat, prevent_cse=prevent_cse)


def _constrained(variable: nnx.Variable, stacked: bool) -> nnx.Variable:
    names = logical_names(variable)
    if not names:
        return variable
    return variable.replace(constrain(variable.get_value(), names[1:] if stacked else names))


def _update(blocks: nnx.Module, rest: nnx.State) -> None:
    if jax.tree.leaves(rest):  # statistics or RNG counts the blocks advanced
        nnx.update(blocks, rest)


def _plain_block(block, x, per_block, *shared):
    del per_block
    return block(x, *shared), None


def stacked_to_blocks(stacked: Mapping, n: int) -> dict:
    """A scanned stack's pure state (`nnx.to_pure_dict`: leaves with leading axis `n`) as `{i: block_state}`."""
    return {i: jax.tree.map(lambda a: a[i], dict(stacked)) for i in range(n)}


def _stack(*arrays):
    """numpy arrays stay on the host (weight import of large models); anything else becomes a jax array."""
    return np.stack(arrays) if all(isinstance(a, np.ndarray) for a in arrays) else jnp.stack(arrays)


def blocks_to_stacked(blocks: Mapping) -> dict:
    """`{i: block_state}` (keys 0..n-1, one structure) as one state whose leaves are stacked on axis 0."""
    keys = sorted(blocks)
    if keys != list(range(len(keys))):
        raise ValueError(f"block states must be keyed 0..n-1, got keys {keys}")
    return jax.tree.map(_stack, *(dict(blocks[i]) for i in keys))
