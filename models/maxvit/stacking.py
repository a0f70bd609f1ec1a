"""MaxViT's two parameter layouts: each stage's repeated blocks scanned (stacked on a leading axis, the default)
or unrolled (per-block names `stages.<s>.rest.blocks.<i>`), and the maps between them.

    to_unrolled(tree, model) / to_scanned(tree, model)   pure-dict trees (parameters, gradients, statistics)
    with unrolled(model): ...                            a scanned model seen block by block (weight import)
    stage_blocks(stage)                                  a stage's blocks in order (first, then the rest)
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx

from jaxattn.models.layers.stack import blocks_to_stacked, stacked_to_blocks


def _scanned_stages(model):
    """`(index, Stack)` of the model's stages whose repeated blocks are scanned."""
    return [(s, stage.rest) for s, stage in enumerate(model.stages) if stage.rest is not None and stage.rest.scan]


def _map_stacks(tree: dict, model, convert) -> dict:
    tree = dict(tree)
    stages = tree["stages"] = dict(tree["stages"])
    for s, stack in _scanned_stages(model):
        stage = stages[s] = dict(stages[s])
        rest = stage["rest"] = dict(stage["rest"])
        rest["blocks"] = convert(rest["blocks"], stack.n)
    return tree


def to_unrolled(tree: dict, model) -> dict:
    """A pure-dict tree of scanned `model` (`nnx.to_pure_dict` of its parameters, gradients or statistics) in
    the unrolled layout: each scanned stage's `rest.blocks` becomes `{i: block_tree}`."""
    return _map_stacks(tree, model, stacked_to_blocks)


def to_scanned(tree: dict, model) -> dict:
    """The inverse of `to_unrolled`: an unrolled tree in the layout of scanned `model`."""
    return _map_stacks(tree, model, lambda blocks, n: blocks_to_stacked(blocks))


def stage_blocks(stage) -> list:
    """The stage's blocks in order (timm's `stages.<s>.blocks.<i>`); an unrolled stage's `rest` only."""
    if stage.rest is not None and stage.rest.scan:
        raise ValueError("stage_blocks needs an unrolled stage (inside `with unrolled(model):`)")
    return [stage.first] + ([] if stage.rest is None else list(stage.rest.blocks))


@contextlib.contextmanager
def unrolled(model):
    """Within the block, every scanned stack of `model` holds per-block modules whose parameters and BatchNorm
    statistics are host copies of its slices, so code written for the unrolled layout (weight import) can fill
    them; on exit those are written back, stacked, and the stacks are scanned again. Not for running the model."""
    kinds = (nnx.Param, nnx.BatchStat)
    stacks = [stack for _, stack in _scanned_stages(model)]
    stacked = []
    for stack in stacks:
        # The other state (stochastic-depth rates, RNG counts) is left stacked: the views only load weights.
        graphdef, weights, other = nnx.split(stack.blocks, kinds, ...)
        host = jax.tree.map(np.array, weights)  # writable copies: loaders assign in place
        stacked.append(stack.blocks)
        stack.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], host), other)
                                 for i in range(stack.n)])
        stack.scan = False
    try:
        yield model
    finally:
        for stack, blocks in zip(stacks, stacked):
            per_block = {i: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(block, kinds)))
                         for i, block in enumerate(stack.blocks)}
            stack.blocks, stack.scan = blocks, True
            state = nnx.state(blocks, kinds)
            nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, blocks_to_stacked(per_block)))
            nnx.update(blocks, state)
