"""`CausalLM`: embedding * sqrt(d), L x [x + mixer(SRMSNorm(x)); x + SGLU(SRMSNorm(x))], SRMSNorm, untied head.

The token mixer is what differs between families (lightning GLA, causal softmax). A mixer is an `nnx.Module` with
`__call__(x [B, T, d], state, pos) -> (y [B, T, d], new_state)` (`state` None for a plain forward) and
`init_state(batch, max_len, dtype)`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models.lm.cache import DecodeCache
from jaxattn.models.lm.layers import INIT_STD, SGLU, dense, srms_norm

BYTE_VOCAB_SIZE = 256 + 4  # bytes plus specials (pad 256, bos 257, eos 258, sep 259) for the embedded default


class DecoderLayer(nnx.Module):
    def __init__(self, mixer: nnx.Module, d_model: int, glu_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.mixer = mixer
        self.mlp = SGLU(d_model, glu_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x, state, pos):
        y, state = self.mixer(srms_norm(x), state, pos)
        x = x + y
        return x + self.mlp(srms_norm(x)), state


class CausalLM(nnx.Module):
    """Token ids `[B, T]` -> logits `[B, T, vocab_size]` (fp32).

    `model(tokens)` is the full-sequence forward. `cache = model.init_cache(batch, max_len)` then
    `logits, cache = model(tokens, cache=cache)` consumes `tokens` after the cached ones: a prompt in one or
    several chunks (prefill), then one token per step; the logits equal those of the full sequence.
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, glu_dim: int,
                 mixer_factory: Callable[[int, nnx.Rngs], nnx.Module], rngs: nnx.Rngs, dtype=None):
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("num_layers", num_layers),
                        ("glu_dim", glu_dim)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        self.vocab_size, self.d_model, self.num_layers = int(vocab_size), int(d_model), int(num_layers)
        self.embed = nnx.Embed(vocab_size, d_model, embedding_init=nnx.initializers.normal(INIT_STD),
                               dtype=dtype, rngs=rngs)
        self.embed_scale = math.sqrt(d_model)
        self.layers = nnx.List([DecoderLayer(mixer_factory(i, rngs), d_model, glu_dim, rngs=rngs, dtype=dtype)
                                for i in range(num_layers)])
        self.head = dense(d_model, vocab_size, rngs=rngs, dtype=dtype)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> DecodeCache:
        """An empty cache for `batch` sequences of at most `max_len` tokens."""
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        states = tuple(layer.mixer.init_state(int(batch), int(max_len), dtype) for layer in self.layers)
        return DecodeCache(jnp.zeros((), jnp.int32), states, int(max_len))

    def __call__(self, tokens, cache: DecodeCache | None = None):
        tokens = self.check_tokens(tokens, cache)
        pos = jnp.zeros((), jnp.int32) if cache is None else cache.pos
        x = self.embed(tokens) * self.embed_scale
        new_states = []
        for i, layer in enumerate(self.layers):
            x, state = layer(x, None if cache is None else cache.layers[i], pos)
            new_states.append(state)
        logits = self.head(srms_norm(x)).astype(jnp.float32)
        if cache is None:
            return logits
        end = pos + tokens.shape[1]
        # Under jit the overflow cannot raise: poison the logits instead of returning silently clipped ones.
        logits = jnp.where(end > cache.max_len, jnp.nan, logits)
        return logits, DecodeCache(end, tuple(new_states), cache.max_len)

    def check_tokens(self, tokens, cache=None):
        """Raises ValueError for anything but int ids `[B, T >= 1]` in range (when concrete) fitting the cache."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"`tokens` must have rank 2 [batch, length], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"`tokens` must be integer token ids, got dtype {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise ValueError(f"`tokens` must hold at least one token, got shape {tuple(tokens.shape)}")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"`tokens` must lie in [0, vocab_size={self.vocab_size}), got range [{lo}, {hi}]")
        if cache is not None:
            if cache.batch_size != tokens.shape[0]:
                raise ValueError(f"`tokens` batch {tokens.shape[0]} differs from the cache batch {cache.batch_size}")
            if tokens.shape[1] > cache.max_len:
                raise ValueError(f"`tokens` length {tokens.shape[1]} exceeds the cache max_len {cache.max_len}")
            if not isinstance(cache.pos, jax.core.Tracer):
                end = int(cache.pos) + tokens.shape[1]
                if end > cache.max_len:
                    raise ValueError(f"too long for the cache: {int(cache.pos)} cached + {tokens.shape[1]} new "
                                     f"tokens > max_len {cache.max_len}")
        return tokens
