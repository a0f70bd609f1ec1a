"""The training loop: `train_and_evaluate(config, workdir)`, with `train_step` and `eval_step`.

One jitted `train_step` advances the sharded `TrainState` (donated) on a global batch; `eval_step` returns sums of
the task's evaluation metrics. Everything a step does is a function of `(config, step)`: the batch (input pipeline),
the dropout / augmentation keys (`fold_in(seed, step)`), the learning rate. Restarting from a checkpoint therefore
continues bit-for-bit where the interrupted run was.

Losses stay on the device between logging points; before anything is logged or saved they are fetched and
checked, so a non-finite loss stops the run before it can overwrite the last good checkpoint.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint as ckpt_lib
from . import datasets, input_pipeline, metrics, optimizer, sharding, tasks, validate
from . import state as state_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving."""


def train_step(state: state_lib.TrainState, batch, rng_state, *, model_def, task, tx, schedule, config):
    """One optimizer step on a global batch. Returns `(new_state, metrics)` (metrics stay on the device)."""
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)

    rng_state = state_lib.reseeded(rng_state, jax.random.fold_in(key, 1))

    def loss_fn(params):
        model = state_lib.merge(model_def.train_graph, params, state.model_state, rng_state)
        with sharding.logical_axis_scope(config.logical_axis_rules):  # the models' activation constraints
            loss, aux = task.train_loss(model, batch, jax.random.fold_in(key, 2))
        return loss, (aux, state_lib.split_model_state(model))

    (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = optimizer.ema_update(ema, params, config.optimizer.ema_decay, state.step)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                              ema_params=ema)
    out = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
           **{k: v for k, v in aux.items()}}
    return new_state, out


def eval_step(params, model_state, batch, rng_state, *, model_def, task, rules):
    """Sums of the task's evaluation metrics over a (masked) global batch."""
    model = state_lib.merge(model_def.eval_graph, params, model_state, rng_state)
    with sharding.logical_axis_scope(rules):
        return task.eval_sums(model, batch)


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # a third to a half of the compile time, slower code


def compile_step(jitted, args, *, fast: bool = False):
    """Compiles `jitted` for `args` (with XLA's backend optimisations off if `fast`: for smoke tests)."""
    lowered = jitted.lower(*args)
    return lowered.compile(compiler_options=FAST_COMPILE) if fast else lowered.compile()


def _total_steps(config, num_train_examples: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size))


def _datasets(config):
    """`(train_source, eval_source, train_preprocess, eval_preprocess, num_outputs)` for the config's task."""
    train_src = input_pipeline.open_split(config, config.train_split)
    eval_src = input_pipeline.open_split(config, config.eval_split)
    if config.task == "classification":
        return (train_src, eval_src, input_pipeline.vision_preprocess(config, train=True),
                input_pipeline.vision_preprocess(config, train=False), input_pipeline.num_classes(config))
    # The embedded corpus fits in memory (every byte once per epoch); a published one is packed on the fly.
    segments = bool(config.get("pack_documents", False))  # segment ids: attention stays inside each document
    if config.dataset in datasets.EMBEDDED:
        train_windows = input_pipeline.TokenWindows(input_pipeline.load_corpus(train_src, config.text_key),
                                                    config.seq_len, segments)
    else:
        train_windows = input_pipeline.PackedDocuments(train_src, config.seq_len, config.text_key, segments)
    eval_windows = input_pipeline.TokenWindows(input_pipeline.load_corpus(eval_src, config.text_key), config.seq_len,
                                               segments)
    return train_windows, eval_windows, None, None, input_pipeline.BYTE_VOCAB_SIZE


class _Evaluator:
    def __init__(self, config, source, preprocess, mesh, step_fn, sequence_keys):
        self.config, self.mesh, self.step_fn, self.sequence_keys = config, mesh, step_fn, sequence_keys
        self.ds = input_pipeline.eval_dataset(
            source, preprocess, global_batch=config.eval_batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), max_examples=config.eval_max_examples)
        self._shardings = self._compiled = None

    def __call__(self, params, model_state, rng_state) -> dict:
        sums = None
        for batch in input_pipeline.to_iterator(self.ds, self.config):
            if self._shardings is None:
                self._shardings = sharding.batch_shardings(self.mesh, batch, sequence_keys=self.sequence_keys)
            args = (params, model_state, sharding.to_global(batch, self._shardings), rng_state)
            if self._compiled is None:
                self._compiled = compile_step(self.step_fn, args, fast=self.config.compile_fast)
            out = self._compiled(*args)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        return jax.device_get(sums)


def _check_finite(pending: list[tuple[int, dict]], last_saved: int | None, ckpt_dir: str):
    """Fetches the losses of steps run since the last check; raises `NonFiniteLossError` on the first bad one."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, fetched):
        # A finite loss with non-finite gradients would still poison the parameters of this step.
        bad = next((k for k in ("loss", "grad_norm") if not np.isfinite(m[k])), None)
        if bad is not None:
            kept = (f"the last good checkpoint (step {last_saved}) in {ckpt_dir} is kept" if last_saved is not None
                    else "no checkpoint was written")
            what = "the loss" if bad == "loss" else f"the loss is {float(m['loss'])} but the gradient norm"
            raise NonFiniteLossError(
                f"training stopped: {what} is {float(m[bad])} at step {step}; {kept} and nothing after it was "
                f"saved. Try a lower optimizer.learning_rate, optimizer.grad_clip_norm > 0, or check the input data.")
    return fetched


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config.model` on `config.dataset`, evaluating at intervals and at the end; resumes from the latest
    checkpoint in `<workdir>/checkpoints`. Returns the final evaluation metrics."""
    validate.validate(config)
    workdir = os.path.abspath(workdir)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    train_src, eval_src, train_prep, eval_prep, num_outputs = _datasets(config)
    total_steps = _total_steps(config, len(train_src))
    tx, schedule = optimizer.make_optimizer(config, total_steps)
    task = tasks.make_task(config, num_outputs)
    model_def, init, abstract_state, state_shardings = state_lib.create(config, num_outputs, tx, mesh, rules)

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                 async_save=config.async_checkpointing)
    train_iter = input_pipeline.to_iterator(input_pipeline.train_dataset(
        train_src, train_prep, seed=config.seed, global_batch=config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count()), config)
    with jax.set_mesh(mesh):
        restored = ckpt.restore_latest(abstract_state)
        if restored is None:
            start, state = 0, init()
        else:
            start, state, data_state, _ = restored
            train_iter.set_state(data_state)
            log.info("resumed from step %d in %s", start, ckpt.directory)
    last_saved = start if restored is not None else None

    rng_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), model_def.rng_state)
    step_fn = functools.partial(train_step, model_def=model_def, task=task, tx=tx, schedule=schedule,
                                config=config)
    evaluator = _Evaluator(config, eval_src, eval_prep, mesh, jax.jit(
        functools.partial(eval_step, model_def=model_def, task=task, rules=rules)),
        task.sequence_keys)
    writer = metrics.MetricWriter(workdir, total_steps=total_steps, start_step=start)
    stop = ckpt_lib.StopRequest()
    meta = {"config": config.to_json_best_effort(), "total_steps": total_steps}
    units = config.batch_size * (config.seq_len if config.task == "lm" else 1)
    unit_name = "tokens" if config.task == "lm" else "examples"

    def evaluate():
        params = state.ema_params if state.ema_params is not None else state.params
        with jax.set_mesh(mesh):
            return task.summarize(evaluator(params, state.model_state, model_def.rng_state))

    result, jitted, pending = {}, None, []
    timer_step, timer = start, time.perf_counter()
    try:
        for step in range(start + 1, total_steps + 1):
            batch = next(train_iter)
            with jax.set_mesh(mesh):
                if jitted is None:
                    batch_shardings = sharding.batch_shardings(mesh, batch, sequence_keys=task.sequence_keys)
                    jitted = compile_step(
                        jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, rng_sharding),
                                out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0),
                        (state, sharding.to_global(batch, batch_shardings), model_def.rng_state),
                        fast=config.compile_fast)
                state, step_metrics = jitted(state, sharding.to_global(batch, batch_shardings), model_def.rng_state)
            pending.append((step, step_metrics))
            stopping = stop.requested(step)
            saving = stopping or step == total_steps or step % config.checkpoint_every == 0
            evaluating = step == total_steps or (config.eval_every and step % config.eval_every == 0)
            if saving or evaluating or step % config.log_every == 0:
                fetched = _check_finite(pending, last_saved, ckpt.directory)  # before anything is saved
                rate = (step - timer_step) * units / max(time.perf_counter() - timer, 1e-9)
                record = {f"train/{k}": float(np.mean([f[k] for f in fetched])) for k in fetched[-1]}
                record[f"train/{unit_name}_per_s"] = rate
                if evaluating:
                    result = evaluate()
                    record.update(result)
                if saving:
                    ckpt.save(step, state, train_iter.get_state(), {**meta, "step": step})
                    last_saved = step
                writer.write(step, record)
                pending, timer_step, timer = [], step, time.perf_counter()  # throughput counts training only
            writer.progress(step)
            if stopping:
                log.warning("SIGTERM: saved step %d; re-run the same command to resume", step)
                break
        else:
            if start >= total_steps:  # already complete: report the final evaluation again
                result = evaluate()
    finally:
        stop.restore()
        ckpt.close()
        writer.close()
    return result
