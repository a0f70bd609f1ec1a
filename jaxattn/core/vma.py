"""Varying-manual-axes (vma) types inside `jax.shard_map(..., check_vma=True)`.

A fresh constant (`jnp.zeros`, a scan's initial carry) is device-invariant, while everything computed from a
shard is varying over the manual axes; `lax.scan`/`fori_loop`/`cond` then reject carries and branches whose
types differ. `varying_like(tree, *refs)` casts the constants to the refs' varying axes (`jax.lax.pcast(...,
to='varying')`). Outside `shard_map`, or under `check_vma=False`, nothing varies and it is the identity.
"""
from __future__ import annotations

import jax


def varying_axes(*refs) -> tuple:
    """The manual axes any of `refs` (arrays or None) varies over, in first-seen order."""
    axes = []
    for ref in jax.tree.leaves(refs):
        for a in jax.typeof(ref).mat.varying:
            if a not in axes:
                axes.append(a)
    return tuple(axes)


def varying_like(tree, *refs):
    """`tree`'s arrays marked varying over every manual axis that one of `refs` varies over and they do not."""
    axes = varying_axes(*refs)

    def cast(x):
        missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree) if axes else tree
