"""`CausalLM`: embedding * sqrt(d), L x [x + mixer(SRMSNorm(x)); x + SGLU(SRMSNorm(x))], SRMSNorm, untied head.

The token mixer is what differs between families (lightning GLA, causal softmax). A mixer is an `nnx.Module` with
`__call__(x [B, T, d], state, pos, constants, segment_ids=None) -> (y [B, T, d], new_state)` (`state` None for a
plain forward; `constants` the layer's entry of `mixer_constants`, or None; `segment_ids` `[B, T]` packed documents
of a full-sequence forward, or None) and `init_state(batch, max_len, dtype)`.

Consecutive layers of one `mixer_group` form a segment: a `Stack` (`models/layers/stack.py`) scanned over
parameters stacked on a leading layer axis, so a 30-layer model compiles one layer per segment (TransNormer: layer
0 with LRPE, then layers 1-29; the softmax baseline: one segment). `scan_layers=False` unrolls them instead; both
hold the same parameters (`models/lm/stacking.py` converts between them and per-layer names).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models.layers import axes
from jaxattn.models.layers.precision import check_dtype
from jaxattn.models.layers.stack import Stack
from jaxattn.models.lm.cache import DecodeCache
from jaxattn.models.lm.layers import SGLU, Embedding, Projection, srms_norm

BYTE_VOCAB_SIZE = 256 + 4  # bytes plus specials (pad 256, bos 257, eos 258, sep 259) for the embedded default
RESIDUAL = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)  # the residual stream's sharding at block boundaries


class DecoderLayer(nnx.Module):
    def __init__(self, mixer: nnx.Module, d_model: int, glu_dim: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.mixer = mixer
        self.mlp = SGLU(d_model, glu_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, state, pos, constants, segment_ids=None):
        y, state = self.mixer(srms_norm(x), state, pos, constants, segment_ids=segment_ids)
        x = x + y
        return axes.constrain(x + self.mlp(srms_norm(x)), RESIDUAL), state


def _layer_step(layer, x, per_layer, pos, segment_ids):
    """One layer inside a segment's scan: `per_layer` is `(state, constants)` of that layer."""
    state, constants = per_layer
    return layer(x, state, pos, constants, segment_ids)


def segment_bounds(num_layers: int, group: Callable[[int], Hashable]) -> tuple[tuple[int, int], ...]:
    """`(first_layer, num_layers)` of each run of consecutive layers with equal `group(i)`."""
    bounds: list[list[int]] = []
    for i in range(num_layers):
        if bounds and group(i) == group(bounds[-1][0]):
            bounds[-1][1] += 1
        else:
            bounds.append([i, 1])
    return tuple((a, n) for a, n in bounds)


class CausalLM(nnx.Module):
    """Token ids `[B, T]` -> logits `[B, T, vocab_size]` (fp32).

    `model(tokens)` is the full-sequence forward; `model(tokens, segment_ids=ids)` (int `[B, T]`) runs packed
    documents, every token attending only to earlier tokens of its own document. `cache = model.init_cache(batch, max_len)` then
    `logits, cache = model(tokens, cache=cache)` consumes `tokens` after the cached ones: a prompt in one or
    several chunks (prefill), then one token per step; the logits equal those of the full sequence.

    `mixer_factory(i, rngs)` builds layer `i`'s mixer; it is called once per segment (under `nnx.vmap` when
    scanned) with the segment's first `i`, so it must build one structure for every layer of a `mixer_group`.
    `mixer_constants(i)`: per-layer arrays that are not parameters (decay slopes), passed to the mixer's call.
    `remat`: rematerialisation policy per layer (`models/layers/remat.py`). `dtype`: compute dtype (None: fp32
    parameters give fp32); `param_dtype`: storage. Logits, norms and softmax statistics stay fp32.
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, glu_dim: int,
                 mixer_factory: Callable[[int, nnx.Rngs], nnx.Module], rngs: nnx.Rngs,
                 mixer_group: Callable[[int], Hashable] | None = None,
                 mixer_constants: Callable[[int], object] | None = None, scan_layers: bool = True,
                 remat: str = "none", dtype=None, param_dtype=jnp.float32):
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("num_layers", num_layers),
                        ("glu_dim", glu_dim)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        dtype, param_dtype = check_dtype("dtype", dtype, allow_none=True), check_dtype("param_dtype", param_dtype)
        self.vocab_size, self.d_model, self.num_layers = int(vocab_size), int(d_model), int(num_layers)
        self.scan_layers = bool(scan_layers)
        self.mixer_constants = mixer_constants
        self.embed = Embedding(vocab_size, d_model, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_scale = math.sqrt(d_model)
        self.segment_bounds = segment_bounds(self.num_layers, mixer_group or (lambda i: 0))

        def layer_factory(first):
            return lambda r: DecoderLayer(mixer_factory(first, r), d_model, glu_dim, rngs=r, dtype=dtype,
                                          param_dtype=param_dtype)
        self.segments = nnx.List([Stack(layer_factory(first), n, rngs=rngs, scan=self.scan_layers, remat=remat)
                                  for first, n in self.segment_bounds])
        self.head = Projection((d_model,), (vocab_size,), (axes.EMBED, axes.VOCAB), rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype, out_dtype=jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> DecodeCache:
        """An empty cache for `batch` sequences of at most `max_len` tokens."""
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        states = []
        for (_, n), segment in zip(self.segment_bounds, self.segments):
            one = segment.template.mixer.init_state(int(batch), int(max_len), dtype)
            states.append(jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), one))
        return DecodeCache(jnp.zeros((), jnp.int32), tuple(states), int(max_len))

    def _constants(self, first: int, n: int):
        if self.mixer_constants is None:
            return None
        return jax.tree.map(lambda *c: jnp.stack(c), *(self.mixer_constants(i) for i in range(first, first + n)))

    def __call__(self, tokens, cache: DecodeCache | None = None, segment_ids=None):
        tokens = self.check_tokens(tokens, cache)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("`segment_ids` are for the full-sequence forward (packed training windows), "
                                 "not with a decoding `cache`")
            segment_ids = jnp.asarray(segment_ids)
            if segment_ids.shape != tokens.shape or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"`segment_ids` must be integer with the shape of `tokens` {tuple(tokens.shape)}, "
                                 f"got {segment_ids.dtype} {tuple(segment_ids.shape)}")
            segment_ids = axes.constrain(segment_ids, (axes.BATCH, axes.LENGTH))
        pos = jnp.zeros((), jnp.int32) if cache is None else cache.pos
        x = axes.constrain(self.embed(tokens) * self.embed_scale, RESIDUAL)
        new_states = []
        for s, ((first, n), segment) in enumerate(zip(self.segment_bounds, self.segments)):
            states = None if cache is None else cache.layers[s]
            x, states = segment.apply(_layer_step, x, (states, self._constants(first, n)), pos, segment_ids)
            new_states.append(states)
        logits = axes.constrain(self.head(srms_norm(x)), (axes.BATCH, axes.LENGTH, axes.VOCAB))
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
