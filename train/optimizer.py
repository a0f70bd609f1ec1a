"""The optimizer: AdamW on a warmup-cosine schedule, global-norm clipping, and an optional EMA of the parameters.

Weight decay applies to matrices and kernels only (`ndim >= 2`); biases, norm scales and other vectors are not
decayed, as in the published recipes.
"""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine to `min_learning_rate` at the end."""
    opt = config.optimizer
    warmup = min(int(opt.warmup_steps), max(total_steps - 1, 0))
    if opt.schedule == "constant":
        constant = optax.constant_schedule(opt.learning_rate)
        if not warmup:
            return constant
        return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), constant], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt.min_learning_rate)


def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation and its learning-rate schedule (for logging)."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


def ema_update(ema, params, decay: float, step):
    """One EMA step: `ema <- d * ema + (1 - d) * params`, with the usual warmup `d = min(decay, (1+t)/(10+t))`
    so that early averages are not dominated by the random initialisation."""
    d = jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(params, ema, 1.0 - d)
