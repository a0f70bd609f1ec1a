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
from jaxattn.models.softmax_lm.heads import HeadRouter, OutputGate


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

    Variants (`heads.py`; each adds its parameters and nothing else):
    - `attention_gate` 'headwise' | 'elementwise': gated attention, `o * sigmoid(x W_g)` per head (or per head
      feature) before `o_proj`; `d_model * heads` (or `* head_dim`) more parameters per layer.
    - `attention_sinks=True`: one learned logit per head in the softmax denominator (`sinks` of
      `dot_product_attention`), `heads` more parameters per layer.
    - `heads_routing=(shared, routed, top_k)`: MoH, each head's output weighted by its router weight (0 for the
      routed heads a token does not choose) before `o_proj`. Every head is still computed for every token (the
      heads share one attention call; skipping per-token heads needs a token-sparse kernel), so this trains the
      routing, not a cheaper layer. The load-balance loss (`balance_weight` times the paper's) is the layer's
      `AuxiliaryLoss`.
    Full-sequence calls take `segment_ids` `[B, T]` (packed documents: `query/key_segment_ids`).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, rngs: nnx.Rngs,
                 rope_base: float = 10000.0, implementation=None, context_parallel: str | None = None,
                 attention_gate: str | None = None, attention_sinks: bool = False, heads_routing=None,
                 balance_weight: float = 0.01, dtype=None, param_dtype=jnp.float32):
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
        self.gate = nnx.data(None if attention_gate is None else
                             OutputGate(d_model, num_heads, self.head_dim, attention_gate, **kw))
        self.router = nnx.data(None if heads_routing is None else
                               HeadRouter(d_model, num_heads, tuple(heads_routing), balance_weight=balance_weight,
                                          **kw))
        self.sinks = nnx.data(None)
        if attention_sinks:
            self.sinks = nnx.data(nnx.Param(jnp.zeros((num_heads,), param_dtype),
                                            **axes.param_metadata((axes.HEADS,))))

    def init_state(self, batch, max_len, dtype):
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def _extras(self):
        return {} if self.sinks is None else {"sinks": self.sinks[...].astype(jnp.float32)}

    def __call__(self, x, state, pos, constants=None, segment_ids=None):
        del constants
        t = x.shape[1]
        q = axes.constrain(apply_rotary(self.q_proj(x), pos, self.rope_base), HEADS_ACTIVATION)
        k = axes.constrain(apply_rotary(self.k_proj(x), pos, self.rope_base), KV_HEADS_ACTIVATION)
        v = axes.constrain(self.v_proj(x), KV_HEADS_ACTIVATION)
        if state is None:
            o = self._full_sequence(q, k, v, segment_ids)
        else:
            keys, values = state
            start = (0, pos, 0, 0)
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
            # Fixed-size cache holding pos + t valid keys per row: the t queries are its last t positions, so
            # `kv_lengths` with `is_causal` gives query pos + i the keys j <= pos + i (no [T, max_len] mask).
            kv_lengths = jnp.full((x.shape[0],), pos + t, jnp.int32)
            o = jaxattn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), is_causal=True,
                                              kv_lengths=kv_lengths, implementation=self.implementation,
                                              **self._extras())
            state = (keys, values)
        if self.gate is not None:
            o = self.gate(x, o)
        if self.router is not None:
            o = (o.astype(jnp.float32) * self.router(x)[..., None]).astype(o.dtype)
        return self.o_proj(axes.constrain(o, HEADS_ACTIVATION)), state

    def _full_sequence(self, q, k, v, segment_ids):
        seg = {} if segment_ids is None else {"query_segment_ids": segment_ids, "key_segment_ids": segment_ids}
        return cp.attention("dot_product_attention", self.context_parallel, q, k, v, is_causal=True,
                            implementation=self.implementation, **seg, **self._extras())


def softmax_lm(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int, glu_dim: int, rngs: nnx.Rngs,
               num_kv_heads: int | None = None, rope_base: float = 10000.0, implementation=None,
               context_parallel: str | None = None, attention_gate: str | None = None, attention_sinks: bool = False,
               heads_routing=None, balance_weight: float = 0.01, scan_layers: bool = True, remat: str = "none",
               dtype=None, param_dtype=jnp.float32) -> CausalLM:
    """Softmax baseline: `CausalLM` with `SoftmaxAttention` (MHA unless `num_kv_heads` is given), every layer in
    one scanned segment. `context_parallel`: 'ring' | 'allgather' | 'ulysses' | None; `attention_gate`,
    `attention_sinks`, `heads_routing`, `balance_weight`: the variants of `SoftmaxAttention`; `scan_layers`,
    `remat`, `dtype`, `param_dtype`: see `CausalLM`."""
    cp.check_strategy(context_parallel, "softmax_lm")
    kv = num_heads if num_kv_heads is None else num_kv_heads

    def mixer(i, r):
        return SoftmaxAttention(d_model, num_heads, kv, rngs=r, rope_base=rope_base,
                                implementation=implementation, context_parallel=context_parallel,
                                attention_gate=attention_gate, attention_sinks=attention_sinks,
                                heads_routing=heads_routing, balance_weight=balance_weight, dtype=dtype,
                                param_dtype=param_dtype)
    return CausalLM(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, glu_dim=glu_dim,
                    mixer_factory=mixer, rngs=rngs, scan_layers=scan_layers, remat=remat, dtype=dtype,
                    param_dtype=param_dtype)
