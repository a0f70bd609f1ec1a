"""Stochastic depth: drop a whole residual branch per sample (Huang et al. 2016)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def drop_path_rates(max_rate: float, depths) -> list[list[float]]:
    """Rates growing linearly from 0 to `max_rate` over all blocks, split per stage (the timm/paper rule)."""
    total = sum(depths)
    rates = [max_rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out


class DropRate(nnx.Variable):
    """A stochastic-depth rate held as data: the per-block rates of a scanned `Stack` (not trained)."""


class DropPath(nnx.Module):
    """Zeroes the input for a random subset of samples (probability `rate`) and rescales the rest by
    `1 / (1 - rate)`. Active only in training mode: `model.eval()` sets `deterministic=True`.

    `rate` is a Python float, or a scalar array: a block built by a scanned `Stack` gets its rate as a traced
    value (`Stack(..., block_args=(rates,))`), stored as a `DropRate` variable that the scan slices per block.
    """

    def __init__(self, rate, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
        if isinstance(rate, (int, float)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"`rate` must be in [0, 1), got {rate}")
            self.rate, active = float(rate), rate > 0
        else:
            rate = jnp.asarray(rate)
            if rate.shape != () or not jnp.issubdtype(rate.dtype, jnp.floating):
                raise ValueError(f"`rate` must be a float or a float scalar array, got shape {rate.shape} "
                                 f"dtype {rate.dtype}")
            if not isinstance(rate, jax.core.Tracer) and not 0.0 <= float(rate) < 1.0:
                raise ValueError(f"`rate` must be in [0, 1), got {float(rate)}")
            self.rate, active = DropRate(rate), True
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork() if (rngs is not None and active) else nnx.data(None)

    def __call__(self, x):
        rate = self.rate[...] if isinstance(self.rate, DropRate) else self.rate
        if self.deterministic or (isinstance(rate, float) and rate == 0.0):
            return x
        if self.rngs is None:
            raise ValueError("DropPath with rate > 0 in training mode needs `rngs` with a 'dropout' stream")
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
