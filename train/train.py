"""The training loop: `train_and_evaluate(config, workdir)`, with `train_step` and `eval_step`.

The steps come from `steps.build_steps` (shared with `train.aot`, which compiles them for TPU slices): one jitted
`train_step` advances the sharded `TrainState` (donated) on a global batch; `eval_step` returns sums of the task's
evaluation metrics. Everything a step does is a function of `(config, step)`: the batch (input pipeline),
the dropout / augmentation keys (`fold_in(seed, step)`), the learning rate. Restarting from a checkpoint therefore
continues bit-for-bit where the interrupted run was.

Losses stay on the device between logging points; before anything is logged or saved they are fetched and
checked, so a non-finite loss stops the run before it can overwrite the last good checkpoint.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as ckpt_lib
from . import datasets, input_pipeline, metrics, sharding, validate
from .steps import build_steps, compile_step, eval_step, total_train_steps, train_step  # noqa: F401 - public

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving."""


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
    def __init__(self, config, source, preprocess, steps):
        self.config, self.steps = config, steps
        self.ds = input_pipeline.eval_dataset(
            source, preprocess, global_batch=config.eval_batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), max_examples=config.eval_max_examples)
        self._shardings = self._compiled = None

    def __call__(self, params, model_state, rng_state) -> dict:
        sums = None
        for batch in input_pipeline.to_iterator(self.ds, self.config):
            if self._shardings is None:
                self._shardings = self.steps.batch_shardings(batch)
            args = (params, model_state, sharding.to_global(batch, self._shardings), rng_state)
            if self._compiled is None:
                self._compiled = compile_step(self.steps.eval_step, args, fast=self.config.compile_fast)
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
    train_src, eval_src, train_prep, eval_prep, num_outputs = _datasets(config)
    total_steps = total_train_steps(config, len(train_src))
    steps = build_steps(config, mesh, num_outputs, total_steps)
    model_def, task = steps.model_def, steps.task

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                 async_save=config.async_checkpointing)
    train_iter = input_pipeline.to_iterator(input_pipeline.train_dataset(
        train_src, train_prep, seed=config.seed, global_batch=config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count()), config)
    with jax.set_mesh(mesh):
        restored = ckpt.restore_latest(steps.abstract_state)
        if restored is None:
            start, state = 0, steps.init()
        else:
            start, state, data_state, _ = restored
            train_iter.set_state(data_state)
            log.info("resumed from step %d in %s", start, ckpt.directory)
    last_saved = start if restored is not None else None

    evaluator = _Evaluator(config, eval_src, eval_prep, steps)
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
                    batch_shardings = steps.batch_shardings(batch)
                    jitted = compile_step(
                        steps.jit_train_step(batch_shardings),
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
