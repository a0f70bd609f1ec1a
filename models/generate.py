"""Autoregressive sampling on any registered language model: one chunked prefill, then one token per step."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def generate(model: nnx.Module, prompt, steps: int, temperature: float = 0.0, rng=None) -> jax.Array:
    """Continues `prompt [B, P]` (int token ids) by `steps` tokens; returns the new tokens `[B, steps]` int32.

    The prompt is consumed in one call (`model(prompt, cache=...)`: chunked lightning attention / one masked
    softmax pass), then each step feeds one token with the carried cache (lightning state or KV cache) inside a
    compiled `lax.scan`. `temperature == 0` is greedy (argmax, deterministic, `rng` unused); otherwise tokens are
    drawn from `softmax(logits / temperature)` with `rng` (a `jax.random` key, required), reproducibly.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"`prompt` must be integer token ids [batch, length >= 1], got shape "
                         f"{tuple(prompt.shape)} dtype {prompt.dtype}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}")
    temperature = float(temperature)
    if not temperature >= 0.0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling with `temperature` > 0 needs `rng` (a jax.random key)")
    model.check_tokens(prompt, None)  # ids in range, before tracing hides them
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, int(steps), jnp.float32(temperature), rng)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(graphdef, state, prompt, steps, temperature, rng):
    model = nnx.merge(graphdef, state)
    batch, length = prompt.shape

    def sample(logits, key):  # temperature is traced: greedy and sampling share one compiled program
        drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
        return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)

    keys = jax.random.split(rng, steps)
    logits, cache = model(prompt, cache=model.init_cache(batch, length + steps))
    first = sample(logits[:, -1], keys[0])

    def step(carry, key):
        token, cache = carry
        logits, cache = model(token[:, None], cache=cache)
        return (sample(logits[:, -1], key), cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), keys[1:])
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)
