"""The pod contract's checks (WORKSPACE, "Pods"), shared by every family's tests: every parameter named, gradients
compiled once per model, and bf16 compute that keeps softmax statistics, norms, reductions and losses in fp32.

Each family's pod test builds its small model with `jaxattn.testing.model_init.abstract_model` and calls these:

    assert_every_parameter_named(model, stacked=lambda path: "blocks" in path)
    (loss, out), grads = loss_and_grads(model, loss_fn, inputs)
    assert_bf16_keeps_fp32(bf16_model, loss_fn, inputs)

`loss_fn(model, inputs) -> (scalar loss, output)`; `image_loss` is the classifiers' one.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes
from jaxattn.testing.lowering import jaxpr_equations

KNOWN_NAMES = frozenset(axes.RULES) | {None}
# Primitives that must never see bf16 inputs: softmax statistics, norms, every reduction (losses included).
FP32_ONLY = frozenset({"exp", "exp2", "log", "log1p", "rsqrt", "sqrt", "pow", "reduce_sum", "reduce_max",
                       "reduce_min", "argmax", "cumsum", "cumlogsumexp", "cummax"})


def assert_every_parameter_named(model: nnx.Module, *, stacked: Callable[[tuple], bool] = lambda path: False):
    """Every `nnx.Param` of `model` names each of its dims with a name of `axes.RULES` (or None), and its first
    name is `axes.LAYERS` exactly when `stacked(path)` (a scanned `Stack`'s variables)."""
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = axes.logical_names(variable)
        assert names is not None and len(names) == variable.get_value().ndim, (path, names)
        assert set(names) <= KNOWN_NAMES, (path, names)
        assert (names[0] == axes.LAYERS) == bool(stacked(path)), (path, names)


def load_pure(model: nnx.Module, pure, kind=nnx.Param) -> nnx.Module:
    """`model` with its `kind` variables set from the pure state `pure` (`nnx.to_pure_dict` layout); returned."""
    state = nnx.state(model, kind)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def image_loss(model, batch):
    """Cross-entropy of a classifier on `batch = (images [B, H, W, C], labels [B])`; returns `(loss, logits)`."""
    images, labels = batch
    logits = model(images)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)), logits


def loss_and_grads(model: nnx.Module, loss_fn: Callable, inputs):
    """`(loss, output), grads` of `loss_fn(model, inputs)` with respect to `model`'s parameters, in the model's
    current mode. Compiled with XLA's backend optimisations off: compile time dominates these small programs.
    Non-parameter state the forward updates (BatchNorm statistics) is not written back."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    run = _value_and_grad(graphdef, loss_fn, has_aux=True)
    compiled = jax.jit(run).lower(params, rest, inputs).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(params, rest, inputs)


def _value_and_grad(graphdef, loss_fn: Callable, *, has_aux: bool):
    """`(params, rest, inputs) -> (value, grads)`: the model is merged outside the differentiated function (a
    forward that writes its state, as BatchNorm's statistics, cannot mutate variables created under `jax.grad`)."""
    def run(params, rest, inputs):
        model = nnx.merge(graphdef, params, rest)
        loss = (lambda m: loss_fn(m, inputs)) if has_aux else (lambda m: loss_fn(m, inputs)[0])
        return nnx.value_and_grad(loss, has_aux=has_aux)(model)
    return run


def bf16_primitives(model: nnx.Module, loss_fn: Callable, inputs) -> set[str]:
    """The primitives of the loss's gradient that take a bf16 operand."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eqns = jaxpr_equations(_value_and_grad(graphdef, loss_fn, has_aux=False), params, rest, inputs)
    return {e.primitive.name for e in eqns if any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in e.invars)}


def assert_bf16_keeps_fp32(model: nnx.Module, loss_fn: Callable, inputs):
    """`model` (built with `dtype='bfloat16'`) stores fp32 parameters, runs its matmuls in bf16 and gives no bf16
    operand to a primitive of `FP32_ONLY`."""
    params = nnx.state(model, nnx.Param)
    assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}, "param_dtype must stay fp32"
    on_bf16 = bf16_primitives(model, loss_fn, inputs)
    assert "dot_general" in on_bf16 or "conv_general_dilated" in on_bf16, sorted(on_bf16)
    assert not on_bf16 & FP32_ONLY, sorted(on_bf16 & FP32_ONLY)
