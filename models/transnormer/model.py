"""TransNormerLLM's token mixer: gated linear attention (GLA) on `jaxattn.lightning_attention`."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.models import context_parallel as cp
from jaxattn.models.lm import CausalLM, dense, lrpe, srms_norm


class GLA(nnx.Module):
    """`out_proj(SRMSNorm(lightning(q, k, v)) * u)` with `q, k, v, u = split(W x)`, SiLU on q and k.

    Heads: `num_heads` of `d_model // num_heads`. Layer 0 applies LRPE to q and k (learnable angles `theta
    [N, H]`, initialised `10000 ** (-2 i / d_model)` as in OpenNLPLab's code), which doubles their head dim.
    Decay slopes are `lightning_slopes(N, layer_idx, num_layers)` (fixed, not parameters).
    Decoding state: `[B, N, H or 2H, H]` fp32, independent of the sequence length.

    `context_parallel` ('lasp2' or None): the full-sequence forward under a mesh whose `'context'` axis is > 1
    runs `jaxattn.context_parallel.lasp2_lightning_attention` over the sequence (sharded along T; LRPE uses the
    tokens' absolute positions, which sharding leaves unchanged); prefill and decoding keep the single-device op.
    """

    def __init__(self, d_model: int, num_heads: int, layer_idx: int, num_layers: int, *, use_lrpe: bool,
                 rngs: nnx.Rngs, block_size: int = 64, implementation=None, context_parallel: str | None = None,
                 dtype=None):
        if d_model % num_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.block_size, self.implementation = block_size, implementation
        self.context_parallel = cp.check_strategy(context_parallel, "transnormer")
        self.qkvu = dense(d_model, 4 * d_model, rngs=rngs, dtype=dtype)
        self.out_proj = dense(d_model, d_model, rngs=rngs, dtype=dtype)
        theta = 10000.0 ** (-2.0 / d_model * jnp.arange(d_model, dtype=jnp.float32))
        self.theta = nnx.data(nnx.Param(theta.reshape(num_heads, self.head_dim)) if use_lrpe else None)

    def init_state(self, batch, max_len, dtype):
        hk = self.head_dim * (2 if self.theta is not None else 1)
        return jnp.zeros((batch, self.num_heads, hk, self.head_dim), jnp.float32)

    def __call__(self, x, state, pos):
        b, t, _ = x.shape
        q, k, v, u = jnp.split(self.qkvu(x), 4, axis=-1)
        heads = lambda z: z.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = heads(nnx.silu(q)), heads(nnx.silu(k)), heads(v)
        if self.theta is not None:
            q, k = lrpe(q, self.theta[...], pos), lrpe(k, self.theta[...], pos)
        slopes = jaxattn.lightning_slopes(self.num_heads, self.layer_idx, self.num_layers)
        if state is None and cp.active(self.context_parallel):
            from jaxattn.context_parallel import lasp2_lightning_attention
            o = lasp2_lightning_attention(q, k, v, slopes=slopes, block_size=self.block_size,
                                          implementation=self.implementation)
        elif state is None:
            o = jaxattn.lightning_attention(q, k, v, slopes=slopes, block_size=self.block_size,
                                            implementation=self.implementation)
        elif t == 1:
            o, state = jaxattn.lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], state, slopes=slopes)
            o = o[:, None]
        else:
            o, state = jaxattn.lightning_attention(q, k, v, slopes=slopes, block_size=self.block_size,
                                                   initial_state=state, return_state=True,
                                                   implementation=self.implementation)
        o = srms_norm(o.reshape(b, t, -1))
        return self.out_proj(u * o), state


def transnormer(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int, glu_dim: int,
                rngs: nnx.Rngs, lrpe_layers: tuple[int, ...] = (0,), block_size: int = 64,
                implementation=None, context_parallel: str | None = None, dtype=None) -> CausalLM:
    """TransNormerLLM: `CausalLM` with a GLA mixer per layer (LRPE on `lrpe_layers`, default layer 0 only).
    `context_parallel`: 'lasp2' or None, see `GLA`."""
    cp.check_strategy(context_parallel, "transnormer")

    def mixer(i, r):
        return GLA(d_model, num_heads, i, num_layers, use_lrpe=i in lrpe_layers, rngs=r, block_size=block_size,
                   implementation=implementation, context_parallel=context_parallel, dtype=dtype)
    return CausalLM(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, glu_dim=glu_dim,
                    mixer_factory=mixer, rngs=rngs, dtype=dtype)
