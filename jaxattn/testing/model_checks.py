"""Checks every vision model's tests make: a finite training gradient, and train/eval modes that differ."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # small models: XLA:CPU compile time dominates


def _loss_and_grads(model, images, labels):
    """`((loss, logits), grads)` of the cross-entropy; the forward's state updates (BatchNorm statistics, RNG
    counts) are written back to `model`, as under `nnx.jit`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, rest, images, labels):
        def loss_fn(module):
            log_probs = jax.nn.log_softmax(logits := module(images))
            return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)), logits
        module = nnx.merge(graphdef, params, rest)
        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(module)
        return (loss, logits), grads, nnx.state(module, nnx.Not(nnx.Param))
    args = (params, rest, images, labels)
    (loss, logits), grads, new_rest = jax.jit(run).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
    nnx.update(model, new_rest)
    return (loss, logits), grads


def train_step_gradients(model, images, labels):
    """Cross-entropy loss, logits and gradients of `model` in train mode (one call, compiled without XLA:CPU's
    backend optimisations); asserts the loss is finite and every parameter gets a finite gradient. Returns
    `(loss, logits, grads)`."""
    model.train()
    (loss, logits), grads = _loss_and_grads(model, images, jnp.asarray(labels))
    assert np.isfinite(float(loss)), f"non-finite training loss {float(loss)}"
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param))), "a parameter got no gradient"
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves), "non-finite gradient"
    return loss, logits, grads


def assert_eval_differs_from_train(model, images, train_logits, forward):
    """In eval mode `forward(model, images)` is deterministic and differs from the train-mode logits (dropout,
    stochastic depth or batch statistics act in training only)."""
    model.eval()
    a, b = forward(model, images), forward(model, images)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(train_logits)), "train and eval modes give the same logits"


def assert_fixture_logits(logits, fixture, *, atol: float = 1e-4):
    """Eval-mode fp32 `logits` of a model loaded from `fixture.state_dict` equal the fixture's within `atol`: the
    parity bar of every reference fixture."""
    logits = np.asarray(logits)
    assert logits.shape == fixture.logits.shape, (logits.shape, fixture.logits.shape)
    np.testing.assert_allclose(logits, fixture.logits, atol=atol, rtol=0)
