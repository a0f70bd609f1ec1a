"""Abstract (allocation-free) model construction that stays fast for large models, and parameter counting.

Why: each RNG draw and each BatchNorm statistics update in flax NNX assigns a `Variable` with `v[...] = value`,
which asks the new value for `.sharding`. On a tracer JAX answers by raising an AttributeError whose message
walks the whole program traced so far (`DynamicJaxprTracer._origin_msg`), so `nnx.eval_shape` of a model with
hundreds of parameters costs time quadratic in its size (maxvit_base: ~90 s instead of ~5 s on 2 busy cores).
`fast_tracing()` skips building that message while tracing (only error texts change); it is a no-op if JAX's
internals move. (To get concrete arrays from an abstract model cheaply, see `jaxattn.testing.model_init`.)
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx


@contextlib.contextmanager
def fast_tracing():
    """Within the block, tracer errors omit their "this value came from ..." origin note (cheap to raise)."""
    try:
        from jax._src.interpreters import partial_eval
        tracer = partial_eval.DynamicJaxprTracer
        original = tracer.__dict__["_origin_msg"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


def eval_shape_model(constructor) -> nnx.Module:
    """`nnx.eval_shape(constructor)` under `fast_tracing()`: shapes only, nothing allocated or computed.

    `constructor` takes no arguments and makes its own `nnx.Rngs` (one made outside cannot advance in the trace),
    e.g. `lambda: models.create_model("maxvit_base", rngs=nnx.Rngs(0))`.
    """
    with fast_tracing():
        return nnx.eval_shape(constructor)


def count_params(model: nnx.Module, kind=nnx.Param) -> int:
    """Number of scalars in the model's `kind` variables (works on abstract models)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind))))
