"""Rematerialisation policies, applied per block: what a block's backward may keep from its forward.

    'none'                              save every residual (fastest; activations of all blocks held at once)
    'full'                              save only the block's inputs; the backward recomputes the whole block
    'dots_saveable'                     keep matmul outputs, recompute the cheap elementwise work between them
    'dots_with_no_batch_dims_saveable'  keep the weight matmuls' outputs (no batch dims: projections, MLP),
                                        recompute attention's batched einsums and the elementwise work

Every family takes `remat=` (default 'none') and wraps each repeated block with `checkpoint`.
"""
from __future__ import annotations

from collections.abc import Callable

import jax

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(remat) -> str:
    """`remat` itself; `ValueError` naming `remat` unless it is one of `POLICIES`."""
    if remat not in POLICIES:
        raise ValueError(f"`remat` must be one of {tuple(POLICIES)}, got {remat!r}")
    return remat


def checkpoint(fn: Callable, remat: str, *, prevent_cse: bool = True) -> Callable:
    """`fn` (a function of arrays; split modules with `nnx.split` first, as `models/layers/stack.py` does)
    rematerialised under policy `remat` (`jax.checkpoint`).

    `prevent_cse=False` is right inside `scan` (the loop already keeps XLA from merging the recomputation with
    the forward) and lets XLA schedule better; unrolled blocks keep the default.
    """
    if check_remat(remat) == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[remat], prevent_cse=prevent_cse)
