"""The softmax baseline's token mixer: causal softmax attention with rotary positions, GQA and a KV cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.models import context_parallel as cp
from jaxattn.models.layers import axes
from jaxattn.models.lm import CausalLM, Projection, apply_rotary
from jaxattn.models.lm.layers import HEADS_ACTIVATION, KV_HEADS_ACTIVATION


class SoftmaxAttention(nnx.Module):
    """`o_proj(softmax(rope(q) rope(k)^T / sqrt(H), causal) v)`; `num_kv_heads < num_heads` is GQA.

    Decoding state: `(keys, values)`, each `[B, max_len, K, H]`; new tokens are written at `pos` and queries see
    cached keys up to their own position (`kv_lengths = pos + T` with `is_causal`).

    `context_parallel` ('ring', 'allgather', 'ulysses' or None): the full-sequence forward under a mesh whose
    `'context'` axis is > 1 runs that `jaxattn.context_parallel` strategy over the sequence (sharded along T);
    prefill and decoding keep the single-device op. Ring and all-gather run load-balanced (zigzag) with the
    strategy moving each layer's q/k/v shards into zigzag order and the output back (`zigzag_order=False`), so
    tokens, rotary positions and outputs stay in natural order in the model.

    Tensor parallelism (Megatron): the query heads and the key/value heads split over the `tensor` mesh axis
    (key/value heads are replicated where it does not divide them, as with GQA's few heads), the output
    projection contracts them and is all-reduced.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, rngs: nnx.Rngs,
                 rope_base: float = 10000.0, implementation=None, context_parallel: str | None = None,
                 dtype=None, param_dtype=jnp.float32):
        if d_model % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads}), and that by "
                             f"`num_kv_heads` ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got d_model // num_heads = {self.head_dim}")
        self.rope_base, self.implementation = rope_base, implementation
        self.context_parallel = cp.check_strategy(context_parallel, "softmax_lm")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        heads, kv_heads = (num_heads, self.head_dim), (num_kv_heads, self.head_dim)
        self.q_proj = Projection((d_model,), heads, (axes.EMBED, axes.HEADS, axes.HEAD_DIM), **kw)
        self.k_proj = Projection((d_model,), kv_heads, (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), **kw)
        self.v_proj = Projection((d_model,), kv_heads, (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), **kw)
        self.o_proj = Projection(heads, (d_model,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), **kw)

    def init_state(self, batch, max_len, dtype):
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def __call__(self, x, state, pos, constants=None):
        del constants
        t = x.shape[1]
        q = axes.constrain(apply_rotary(self.q_proj(x), pos, self.rope_base), HEADS_ACTIVATION)
        k = axes.constrain(apply_rotary(self.k_proj(x), pos, self.rope_base), KV_HEADS_ACTIVATION)
        v = axes.constrain(self.v_proj(x), KV_HEADS_ACTIVATION)
        if state is None:
            o = self._full_sequence(q, k, v)
        else:
            keys, values = state
            start = (0, pos, 0, 0)
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
            # Fixed-size cache holding pos + t valid keys per row: the t queries are its last t positions, so
            # `kv_lengths` with `is_causal` gives query pos + i the keys j <= pos + i (no [T, max_len] mask).
            kv_lengths = jnp.full((x.shape[0],), pos + t, jnp.int32)
            o = jaxattn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), is_causal=True,
                                              kv_lengths=kv_lengths, implementation=self.implementation)
            state = (keys, values)
        return self.o_proj(axes.constrain(o, HEADS_ACTIVATION)), state

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
               context_parallel: str | None = None, scan_layers: bool = True, remat: str = "none", dtype=None,
               param_dtype=jnp.float32) -> CausalLM:
    """Softmax baseline: `CausalLM` with `SoftmaxAttention` (MHA unless `num_kv_heads` is given), every layer in
    one scanned segment. `context_parallel`: 'ring' | 'allgather' | 'ulysses' | None, see `SoftmaxAttention`;
    `scan_layers`, `remat`, `dtype`, `param_dtype`: see `CausalLM`."""
    cp.check_strategy(context_parallel, "softmax_lm")
    kv = num_heads if num_kv_heads is None else num_kv_heads

    def mixer(i, r):
        return SoftmaxAttention(d_model, num_heads, kv, rngs=r, rope_base=rope_base,
                                implementation=implementation, context_parallel=context_parallel, dtype=dtype,
                                param_dtype=param_dtype)
    return CausalLM(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, glu_dim=glu_dim,
                    mixer_factory=mixer, rngs=rngs, scan_layers=scan_layers, remat=remat, dtype=dtype,
                    param_dtype=param_dtype)
