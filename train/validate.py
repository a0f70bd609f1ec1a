"""Checks a config before anything is built, so a bad value fails at once with a message naming the field."""
from __future__ import annotations

import math

import jax

from jaxattn.models.layers import axes, precision, remat

from . import sharding


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _fail(field: str, value, expected: str):
    raise ConfigError(f"config.{field} = {value!r}: {expected}")


def _positive_int(config, field: str):
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(field, value, "must be a positive integer")


def validate(config, *, num_devices: int | None = None, process_count: int | None = None):
    """Raises `ConfigError` (a `ValueError`) naming the field for any value that cannot work."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    if config.task not in ("classification", "lm"):
        _fail("task", config.task, "must be 'classification' or 'lm'")
    if not config.model:
        _fail("model", config.model, "must name a registered model (jaxattn.models.list_models()) or "
                                     "'package.module:builder'")
    if not config.dataset:
        _fail("dataset", config.dataset, "must name a TFDS dataset (or an embedded one: digits, stdlib_bytes)")
    for field in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                  "data_threads", "prefetch_batches"):
        _positive_int(config, field)
    if config.task == "classification":
        _positive_int(config, "image_size")
    else:
        _positive_int(config, "seq_len")
    if config.num_train_steps == 0 or config.num_train_steps < -1:
        _fail("num_train_steps", config.num_train_steps, "must be positive (or -1 to use num_epochs)")
    if config.num_train_steps == -1 and not (config.num_epochs > 0 and math.isfinite(config.num_epochs)):
        _fail("num_epochs", config.num_epochs, "must be positive when num_train_steps is -1")
    for field in ("eval_every", "eval_max_examples", "data_workers"):
        if config[field] < 0:
            _fail(field, config[field], "must be >= 0")

    opt = config.optimizer
    if not (opt.learning_rate > 0 and math.isfinite(opt.learning_rate)):
        _fail("optimizer.learning_rate", opt.learning_rate, "must be a positive finite number")
    if not 0 <= opt.min_learning_rate <= opt.learning_rate:
        _fail("optimizer.min_learning_rate", opt.min_learning_rate, "must be in [0, learning_rate]")
    if opt.warmup_steps < 0:
        _fail("optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
    if opt.schedule not in ("cosine", "constant"):
        _fail("optimizer.schedule", opt.schedule, "must be 'cosine' or 'constant'")
    if opt.weight_decay < 0:
        _fail("optimizer.weight_decay", opt.weight_decay, "must be >= 0")
    for field in ("b1", "b2"):
        if not 0 <= opt[field] < 1:
            _fail(f"optimizer.{field}", opt[field], "must be in [0, 1)")
    if opt.grad_clip_norm < 0:
        _fail("optimizer.grad_clip_norm", opt.grad_clip_norm, "must be >= 0 (0 disables clipping)")
    if not 0 <= opt.ema_decay < 1:
        _fail("optimizer.ema_decay", opt.ema_decay, "must be in [0, 1) (0 disables the EMA)")

    inp = config.input
    if not (0 < inp.crop_scale[0] <= inp.crop_scale[1] <= 1):
        _fail("input.crop_scale", inp.crop_scale, "must be (lo, hi) with 0 < lo <= hi <= 1")
    if not 0 < inp.crop_pct <= 1:
        _fail("input.crop_pct", inp.crop_pct, "must be in (0, 1]")
    if not 0 <= inp.label_smoothing < 1:
        _fail("input.label_smoothing", inp.label_smoothing, "must be in [0, 1)")
    if inp.mixup_alpha < 0 or inp.cutmix_alpha < 0:
        _fail("input.mixup_alpha/cutmix_alpha", (inp.mixup_alpha, inp.cutmix_alpha), "must be >= 0")
    if len(inp.mean) != inp.channels or len(inp.std) != inp.channels or min(inp.std) <= 0:
        _fail("input.mean/std", (inp.mean, inp.std), f"need {inp.channels} values each, std > 0")

    try:
        sizes = sharding.resolve_mesh_sizes(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh = {dict(config.mesh)!r}: {e}") from None
    data_parallel = math.prod(sizes[a] for a in sharding.BATCH_AXES)
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % data_parallel or config[field] % process_count:
            _fail(field, config[field], f"must be divisible by the data-parallel mesh size {data_parallel} "
                                        f"(data x fsdp) and by the {process_count} processes")
    _check_context_split(config, sizes[sharding.CONTEXT_AXIS])
    _check_model_options(config)


def _check_model_options(config) -> None:
    """Remat policy, dtypes and logical-axis overrides (the per-model checks happen when the model is built)."""
    if config.get("remat", "none") not in remat.POLICIES:
        _fail("remat", config.remat, f"must be one of {tuple(remat.POLICIES)}")
    for field in ("dtype", "param_dtype"):
        try:
            precision.check_dtype(field, config.get(field, "float32"))
        except ValueError:
            _fail(field, config.get(field), "must be a floating-point dtype name such as 'float32' or 'bfloat16'")
    try:
        table = axes.rules(config.logical_axis_rules)
    except ValueError as e:
        _fail("logical_axis_rules", config.logical_axis_rules, str(e))
    for name, targets in table.items():
        unknown = [t for t in targets if t not in sharding.MESH_ORDER]
        if unknown:
            _fail("logical_axis_rules", config.logical_axis_rules,
                  f"{name!r} maps to {unknown}, which are not mesh axes ({', '.join(sharding.MESH_ORDER)})")


def _check_context_split(config, context: int) -> None:
    """The `context` mesh axis shards sequences, and image rows (vision: `Classification.sequence_keys`) alike;
    the load-balanced ring / all-gather cut each sequence into `2 * context` zigzag chunks."""
    if context == 1:
        return
    if config.task == "classification" and config.image_size % context:
        _fail("image_size", config.image_size, f"image rows are sharded over the context mesh axis, so they must "
                                                f"be divisible by its size {context}")
    if config.task != "lm":
        return
    strategy = config.get("context_parallel", "")
    if strategy in ("ring", "allgather") and config.seq_len % (2 * context):
        _fail("seq_len", config.seq_len, f"context_parallel {strategy!r} load-balances causal attention over "
                                         f"2 x context = {2 * context} zigzag chunks, so it must be divisible by "
                                         f"{2 * context}")
    if config.seq_len % context:
        _fail("seq_len", config.seq_len, f"must be divisible by the context axis size {context}")
