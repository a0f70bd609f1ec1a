"""Cheap model construction for tests: build a model abstractly, then give it concrete arrays.

Eager NNX initialisation compiles one small XLA program per distinct parameter shape (random initialisers are
jitted per shape): 10-15 s of CPU for a pico-sized model on the 2-core machine, paid again in every pytest worker.
`abstract_model(constructor)` runs the constructor under `nnx.eval_shape` (nothing computed) and `materialize`
fills the variables:

- `fill="zeros"`: every array zero, for models that are about to be loaded from a state dict;
- `fill="random"`: a usable random model: LayerNorm/BatchNorm scales and variances 1, biases and means 0, other
  parameters normal with std `fan_in ** -0.5` (1-D ones: 0.02), rng keys from `seed`.

Not a replacement for the real initialisers (their distributions are not reproduced); it is for tests of
shapes, loading, gradients and modes.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx



def abstract_model(constructor, *, fill: str = "random", seed: int = 0) -> nnx.Module:
    """`constructor()` (e.g. `lambda: models.create_model(...)`) built under `nnx.eval_shape`, then materialised."""
    return materialize(nnx.eval_shape(constructor), fill=fill, seed=seed)


def _fill(index, path, spec, variable_type, fill, rng, seed):
    if jax.dtypes.issubdtype(spec.dtype, jax.dtypes.prng_key):
        key = jax.random.fold_in(jax.random.key(seed), index)  # distinct streams per module
        return jax.random.split(key, spec.shape) if spec.shape else key  # stacked keys: a scanned Stack's
    if not np.issubdtype(spec.dtype, np.floating) or fill == "zeros":
        return np.zeros(spec.shape, spec.dtype)
    name = str(path[-1])
    if name in ("scale", "var"):
        return np.ones(spec.shape, spec.dtype)
    if name in ("bias", "mean") or not issubclass(variable_type, nnx.Param):
        return np.zeros(spec.shape, spec.dtype)
    std = 0.02 if len(spec.shape) <= 1 else float(np.prod(spec.shape[:-1])) ** -0.5
    return (rng.standard_normal(spec.shape) * std).astype(spec.dtype)


def materialize(model: nnx.Module, *, fill: str = "random", seed: int = 0) -> nnx.Module:
    """Replaces every abstract variable of `model` (from `nnx.eval_shape`) by a concrete array, in place."""
    if fill not in ("random", "zeros"):
        raise ValueError(f"`fill` must be 'random' or 'zeros', got {fill!r}")
    rng = np.random.default_rng(seed)
    for index, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model))):
        variable.set_value(_fill(index, path, variable.get_value(), type(variable), fill, rng, seed))
    return model
