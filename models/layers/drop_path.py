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


class DropPath(nnx.Module):
    """Zeroes the input for a random subset of samples (probability `rate`) and rescales the rest by
    `1 / (1 - rate)`. Active only in training mode: `model.eval()` sets `deterministic=True`."""

    def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`rate` must be in [0, 1), got {rate}")
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork() if (rngs is not None and rate > 0) else nnx.data(None)

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        if self.rngs is None:
            raise ValueError("DropPath with rate > 0 in training mode needs `rngs` with a 'dropout' stream")
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))
