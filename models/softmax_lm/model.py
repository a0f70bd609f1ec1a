"""The softmax baseline's token mixer: causal softmax attention with rotary positions, GQA and a KV cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.models import context_parallel as cp
from jaxattn.models.lm import CausalLM, apply_rotary, dense


class SoftmaxAttention(nnx.Module):
    """`o_proj(softmax(rope(q) rope(k)^T / sqrt(H), causal) v)`; `num_kv_heads < num_heads` is GQA.

    Decoding state: `(keys, values)`, each `[B, max_len, K, H]`; new tokens are written at `pos` and queries see
    cached keys up to their own position.

    `context_parallel` ('ring', 'allgather', 'ulysses' or None): the full-sequence forward under a mesh whose
    `'context'` axis is > 1 runs that `jaxattn.context_parallel` strategy over the sequence (sharded along T);
    prefill and decoding keep the single-device op. Ring and all-gather run load-balanced (zigzag) with the
    strategy moving each layer's q/k/v shards into zigzag order and the output back (`zigzag_order=False`), so
    tokens, rotary positions and outputs stay in natural order in the model.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, rngs: nnx.Rngs,
                 rope_base: float = 10000.0, implementation=None, context_parallel: str | None = None,
                 dtype=None):
        if d_model % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads}), and that by "
                             f"`num_kv_heads` ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got d_model // num_heads = {self.head_dim}")
        self.rope_base, self.implementation = rope_base, implementation
        self.context_parallel = cp.check_strategy(context_parallel, "softmax_lm")
        self.q_proj = dense(d_model, d_model, rngs=rngs, dtype=dtype)
        self.k_proj = dense(d_model, num_kv_heads * self.head_dim, rngs=rngs, dtype=dtype)
        self.v_proj = dense(d_model, num_kv_heads * self.head_dim, rngs=rngs, dtype=dtype)
        self.o_proj = dense(d_model, d_model, rngs=rngs, dtype=dtype)

    def init_state(self, batch, max_len, dtype):
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def __call__(self, x, state, pos):
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), pos, self.rope_base)
        k = apply_rotary(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), pos, self.rope_base)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if state is None:
            o = self._full_sequence(q, k, v)
        else:
            keys, values = state
            start = (0, pos, 0, 0)
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
            # Fixed-size cache: mask by absolute position (query pos + i sees keys j <= pos + i).
            mask = jnp.arange(keys.shape[1])[None, :] <= (pos + jnp.arange(t))[:, None]
            o = jaxattn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                              mask=mask[None, None], implementation=self.implementation)
            state = (keys, values)
        return self.o_proj(o.reshape(b, t, -1)), state

    def _full_sequence(self, q, k, v):
        if not cp.active(self.context_parallel):
            return jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        from jaxattn import context_parallel as strategies
        kwargs = dict(is_causal=True, implementation=self.implementation)
        if self.context_parallel == "ulysses":
            return strategies.ulysses_attention(q, k, v, **kwargs)
        fn = strategies.ring_attention if self.context_parallel == "ring" else strategies.allgather_attention
        return fn(q, k, v, load_balance=True, **kwargs)


def softmax_lm(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int, glu_dim: int, rngs: nnx.Rngs,
               num_kv_heads: int | None = None, rope_base: float = 10000.0, implementation=None,
               context_parallel: str | None = None, dtype=None) -> CausalLM:
    """Softmax baseline: `CausalLM` with `SoftmaxAttention` (MHA unless `num_kv_heads` is given).
    `context_parallel`: 'ring' | 'allgather' | 'ulysses' | None, see `SoftmaxAttention`."""
    cp.check_strategy(context_parallel, "softmax_lm")
    kv = num_heads if num_kv_heads is None else num_kv_heads

    def mixer(i, r):
        return SoftmaxAttention(d_model, num_heads, kv, rngs=r, rope_base=rope_base,
                                implementation=implementation, context_parallel=context_parallel, dtype=dtype)
    return CausalLM(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, glu_dim=glu_dim,
                    mixer_factory=mixer, rngs=rngs, dtype=dtype)
