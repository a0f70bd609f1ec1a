"""Tiny models for testing the training loop quickly (not in the model registry).

Referenced from configs as `config.model = "tiny_train_models:classifier"` (this folder on the import path).
They use what real models use: BatchNorm statistics, dropout RNG streams, a logical sharding annotation.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx


class Calls(nnx.Variable):
    """A counter of training-mode calls (model state, like BatchNorm statistics)."""


class Classifier(nnx.Module):
    """`poison_after=n`: logits become NaN from the (n+1)-th training call on (tests the non-finite guard).
    `delay=s`: each call sleeps `s` seconds on the host (gives tests time to signal a running process)."""

    def __init__(self, *, num_classes: int, width: int = 8, dropout: float = 0.1, poison_after: int = 0,
                 delay: float = 0.0, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, width, (3, 3), strides=(2, 2), rngs=rngs)
        self.norm = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab"))
        self.head = nnx.Linear(width, num_classes, kernel_init=init, rngs=rngs)
        self.poison_after, self.delay = poison_after, delay
        self.calls = Calls(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        if self.delay:
            jax.debug.callback(lambda: time.sleep(self.delay))
        x = jax.nn.relu(self.norm(self.conv(x)))
        logits = self.head(self.drop(x.mean(axis=(1, 2))))
        if not self.drop.deterministic:
            self.calls[...] += 1
        if self.poison_after:
            logits = jnp.where(self.calls[...] > self.poison_after, jnp.nan, logits)
        return logits


class LanguageModel(nnx.Module):
    """Embedding, one causal depthwise mix of the previous 4 tokens, an MLP, and a head."""

    def __init__(self, *, vocab_size: int, dim: int = 32, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.mix = nnx.Param(jnp.full((4, dim), 0.25))
        self.mlp = nnx.Linear(dim, dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        shifted = [jnp.pad(x, ((0, 0), (k, 0), (0, 0)))[:, :x.shape[1]] for k in range(4)]
        x = x + sum(w * s for w, s in zip(self.mix[...], shifted))
        return self.head(x + jax.nn.gelu(self.mlp(x)))


def classifier(*, rngs, num_classes, **kwargs):
    return Classifier(num_classes=num_classes, rngs=rngs, **kwargs)


def language_model(*, rngs, vocab_size, **kwargs):
    return LanguageModel(vocab_size=vocab_size, rngs=rngs, **kwargs)
