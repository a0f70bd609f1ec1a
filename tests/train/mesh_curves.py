"""Training curves of the real train step on a given mesh, for the tests that compare meshes (context and tensor
parallelism): the same config and fixed data must train alike on any layout."""
from __future__ import annotations

import functools
import math

import jax
import ml_collections
import numpy as np

from jaxattn.configs import base
from jaxattn.train import state as state_lib

STEPS = 3
RTOL = 1e-5  # fp32: only the order of reductions differs between the meshes
REFERENCE_MESH = {"data": 2, "fsdp": 1, "tensor": 1, "context": 1}
# A tiny LM of either family (sizes chosen so every strategy's and tensor split's divisibility rules hold).
LM = dict(vocab_size=260, d_model=32, num_layers=1, num_heads=4, glu_dim=48)


def config(model, *, task="lm", strategy="", **model_kwargs):
    c = base.get_config()
    c.task, c.model, c.context_parallel = task, model, strategy
    c.model_kwargs = ml_collections.ConfigDict(model_kwargs)
    c.batch_size = c.eval_batch_size = 4
    c.num_train_steps = STEPS
    c.optimizer.update(warmup_steps=1, learning_rate=1e-2)
    c.input.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    return c


def lm_batches(seq_len, batch=4):
    rng = np.random.default_rng(0)
    return [{"inputs": rng.integers(0, 260, (batch, seq_len), dtype=np.int32),
             "targets": rng.integers(0, 260, (batch, seq_len), dtype=np.int32)} for _ in range(STEPS)]


def image_batches(size, batch=4):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, (batch,), dtype=np.int32)} for _ in range(STEPS)]


def curves(config, mesh_axes, batches, num_outputs, *, inspect=None):
    """`(losses, grad_norms)` of `STEPS` train steps of the real train step on `batches` under `mesh_axes`.
    `inspect(state_shardings)` (optional) sees the train state's shardings."""
    from jaxattn.train import optimizer, sharding, tasks, train
    mesh = sharding.make_mesh(mesh_axes, devices=jax.devices()[:math.prod(mesh_axes.values())])
    rules = sharding.logical_rules(config)
    tx, schedule = optimizer.make_optimizer(config, STEPS)
    task = tasks.make_task(config, num_outputs)
    model_def, init, _, state_shardings = state_lib.create(config, num_outputs, tx, mesh, rules)
    if inspect is not None:
        inspect(state_shardings)
    step_fn = functools.partial(train.train_step, model_def=model_def, task=task, tx=tx, schedule=schedule,
                                config=config)
    batch_shardings = sharding.batch_shardings(mesh, batches[0], sequence_keys=task.sequence_keys)
    rng_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), model_def.rng_state)
    losses, norms, compiled = [], [], None
    with jax.set_mesh(mesh):
        state = init()
        for batch in batches:
            args = (state, sharding.to_global(batch, batch_shardings), model_def.rng_state)
            if compiled is None:
                jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, rng_sharding),
                                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
                compiled = train.compile_step(jitted, args, fast=True)
            state, metrics = compiled(*args)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
    return np.array(losses), np.array(norms)


def assert_same_curves(name, got, want):
    for what, g, w in zip(("loss", "grad_norm"), got, want):
        assert np.all(np.isfinite(g)), (name, what, g)
        np.testing.assert_allclose(g, w, rtol=RTOL, err_msg=f"{name}: {what} curve differs from the reference mesh")
