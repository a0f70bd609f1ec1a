"""Auxiliary training losses that layers compute in their forward (MoH's load balance, for instance).

A layer keeps an `AuxiliaryLoss` variable (a non-parameter, so it lives in the model state and survives scanned
`Stack`s like BatchNorm statistics) and overwrites it with its weighted loss on every forward; the task adds
`total(model)` to the training loss after the forward and logs it. Layers without one contribute nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class AuxiliaryLoss(nnx.Variable):
    """A scalar (or per-layer stacked) loss already multiplied by its weight."""


def total(model) -> jax.Array:
    """The sum of every `AuxiliaryLoss` in `model` (0.0 when there is none), as of its last forward."""
    leaves = jax.tree.leaves(nnx.state(model, AuxiliaryLoss))
    return sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.zeros((), jnp.float32))
