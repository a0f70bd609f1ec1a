"""Per-head weights on the attention output, before the output projection: gated attention and mixture-of-heads.

- `OutputGate` (Qiu et al. 2025, "Gated Attention for LLMs"; Qwen3-Next): `Y' = Y * sigmoid(X W_g)`, `X` the
  layer's (normed) input, no bias. 'elementwise': `W_g [d_model, heads, head_dim]`; 'headwise': one scalar per
  head, `W_g [d_model, heads]`.
- `HeadRouter` (MoH, Jin et al. 2024): heads are experts; `shared` heads always on, `routed` heads top-k per token.
  `[a1, a2] = softmax(W_h x)`; shared head i gets `a1 softmax(W_s x)_i`; routed head i gets `a2 softmax(W_r x)_i`
  if i is among the top-k of `W_r x`, else 0; the output is `sum_i g_i head_i W_O^i`. Load balance (the paper's
  `L_b = sum_i f_i P_i` over routed heads, `f_i` the fraction of tokens choosing head i, `P_i` its mean routing
  probability), times `balance_weight`, is stored in an `AuxiliaryLoss` the task adds to the training loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes
from jaxattn.models.layers.auxiliary import AuxiliaryLoss
from jaxattn.models.lm import Projection

F32 = jnp.float32
GATES = ("headwise", "elementwise")


class OutputGate(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, head_dim: int, kind: str, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=F32):
        if kind not in GATES:
            raise ValueError(f"`attention_gate` must be None or one of {GATES}, got {kind!r}")
        self.kind = kind
        shape, names = ((num_heads,), (axes.EMBED, axes.HEADS)) if kind == "headwise" else \
            ((num_heads, head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM))
        self.proj = Projection((d_model,), shape, names, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                               out_dtype=F32)

    def __call__(self, x, o):
        """`x [B, T, d]` the layer's input, `o [B, T, N, H]` attention outputs -> gated `o` (o's dtype)."""
        gate = jax.nn.sigmoid(self.proj(x))
        if self.kind == "headwise":
            gate = gate[..., None]
        return (o.astype(F32) * gate).astype(o.dtype)


class HeadRouter(nnx.Module):
    """MoH weights `g [B, T, N]` (module docstring). `routing = (shared, routed, top_k)` with `shared + routed ==
    num_heads` and `1 <= top_k <= routed`."""

    def __init__(self, d_model: int, num_heads: int, routing, *, balance_weight: float = 0.01, rngs: nnx.Rngs,
                 dtype=None, param_dtype=F32):
        if not (isinstance(routing, (tuple, list)) and len(routing) == 3
                and all(isinstance(r, int) and not isinstance(r, bool) for r in routing)):
            raise ValueError(f"`heads_routing` must be (shared, routed, top_k) ints, got {routing!r}")
        shared, routed, top_k = routing
        if shared < 1 or routed < 1 or shared + routed != num_heads or not 1 <= top_k <= routed:
            raise ValueError(f"`heads_routing` (shared, routed, top_k) = {tuple(routing)} needs shared, routed >= 1, "
                             f"shared + routed == num_heads ({num_heads}) and 1 <= top_k <= routed")
        self.shared, self.routed, self.top_k, self.balance_weight = shared, routed, top_k, float(balance_weight)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, out_dtype=F32)
        self.w_shared = Projection((d_model,), (shared,), (axes.EMBED, None), **kw)
        self.w_routed = Projection((d_model,), (routed,), (axes.EMBED, None), **kw)
        self.w_mix = Projection((d_model,), (2,), (axes.EMBED, None), **kw)
        self.balance_loss = AuxiliaryLoss(jnp.zeros((), F32))

    def __call__(self, x):
        """`x [B, T, d]` -> head weights `[B, T, N]` fp32 (shared heads first); updates `balance_loss`."""
        mix = jax.nn.softmax(self.w_mix(x), axis=-1)
        shared = mix[..., :1] * jax.nn.softmax(self.w_shared(x), axis=-1)
        logits = self.w_routed(x)
        probs = jax.nn.softmax(logits, axis=-1)
        _, chosen = jax.lax.top_k(logits, self.top_k)
        selected = jnp.sum(jax.nn.one_hot(chosen, self.routed, dtype=F32), axis=-2)  # [B, T, routed] of 0/1
        routed = mix[..., 1:] * probs * selected
        fraction = jnp.mean(selected, axis=(0, 1))  # f_i
        mean_prob = jnp.mean(probs, axis=(0, 1))  # P_i
        self.balance_loss.value = self.balance_weight * jnp.sum(jax.lax.stop_gradient(fraction) * mean_prob)
        return jnp.concatenate([shared, routed], axis=-1)
