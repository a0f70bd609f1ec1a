"""TransNormerLLM's token mixer: gated linear attention (GLA) on `jaxattn.lightning_attention`."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.models import context_parallel as cp
from jaxattn.models.layers import axes
from jaxattn.models.lm import CausalLM, Projection, lrpe, srms_norm
from jaxattn.models.lm.layers import HEADS_ACTIVATION


class GLA(nnx.Module):
    """`out_proj(SRMSNorm(lightning(q, k, v)) * u)` with `q, k, v, u = split(W x)`, SiLU on q and k.

    Heads: `num_heads` of `d_model // num_heads`. Layer 0 applies LRPE to q and k (learnable angles `theta
    [N, H]`, initialised `10000 ** (-2 i / d_model)` as in OpenNLPLab's code), which doubles their head dim.
    Decay slopes `[N]` are the layer's `constants` (`lightning_slopes(N, layer_idx, num_layers)`: fixed, not
    parameters, so every layer without LRPE has the same structure and the stack scans over them).
    Decoding state: `[B, N, H or 2H, H]` fp32, independent of the sequence length.

    Tensor parallelism (Megatron): `qkvu` `[d, 4, N, H]` and `out_proj` `[N, H, d]` split the heads over the
    `tensor` mesh axis; lightning attention runs per head, the SRMSNorm over all heads reduces over the axis.
    The LRPE angles stay fp32 whatever `param_dtype` is (phases of long sequences).

    `context_parallel` ('lasp2' or None): the full-sequence forward under a mesh whose `'context'` axis is > 1
    runs `jaxattn.context_parallel.lasp2_lightning_attention` over the sequence (sharded along T; LRPE uses the
    tokens' absolute positions, which sharding leaves unchanged); prefill and decoding keep the single-device op.
    """

    def __init__(self, d_model: int, num_heads: int, *, use_lrpe: bool, rngs: nnx.Rngs, block_size: int = 64,
                 implementation=None, context_parallel: str | None = None, dtype=None, param_dtype=jnp.float32):
        if d_model % num_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.block_size, self.implementation = block_size, implementation
        self.context_parallel = cp.check_strategy(context_parallel, "transnormer")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        heads = (num_heads, self.head_dim)
        self.qkvu = Projection((d_model,), (4, *heads), (axes.EMBED, None, axes.HEADS, axes.HEAD_DIM), **kw)
        self.out_proj = Projection(heads, (d_model,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), **kw)
        theta = 10000.0 ** (-2.0 / d_model * jnp.arange(d_model, dtype=jnp.float32))
        self.theta = nnx.data(nnx.Param(theta.reshape(heads), **axes.param_metadata((axes.HEADS, axes.HEAD_DIM)))
                              if use_lrpe else None)

    def init_state(self, batch, max_len, dtype):
        hk = self.head_dim * (2 if self.theta is not None else 1)
        return jnp.zeros((batch, self.num_heads, hk, self.head_dim), jnp.float32)

    def __call__(self, x, state, pos, slopes, segment_ids=None):
        """`slopes`: this layer's decay slopes `[N]` (its entry of the stack's `mixer_constants`); `segment_ids`
        `[B, T]`: packed documents (full-sequence forward), the recurrent state reset at each document."""
        t = x.shape[1]
        q, k, v, u = (axes.constrain(z, HEADS_ACTIVATION) for z in jnp.unstack(self.qkvu(x), axis=2))
        q, k = nnx.silu(q), nnx.silu(k)
        if self.theta is not None:
            q, k = lrpe(q, self.theta[...], pos), lrpe(k, self.theta[...], pos)
        if state is None:
            o = cp.attention("lightning_attention", self.context_parallel, q, k, v, slopes=slopes,
                             block_size=self.block_size, segment_ids=segment_ids, implementation=self.implementation)
        elif t == 1:
            o, state = jaxattn.lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], state, slopes=slopes)
            o = o[:, None]
        else:
            o, state = jaxattn.lightning_attention(q, k, v, slopes=slopes, block_size=self.block_size,
                                                   initial_state=state, return_state=True,
                                                   implementation=self.implementation)
        o = srms_norm(axes.constrain(o, HEADS_ACTIVATION), axis=(-2, -1))
        return self.out_proj(u * o), state


def transnormer(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int, glu_dim: int,
                rngs: nnx.Rngs, lrpe_layers: tuple[int, ...] = (0,), block_size: int = 64,
                implementation=None, context_parallel: str | None = None, scan_layers: bool = True,
                remat: str = "none", dtype=None, param_dtype=jnp.float32) -> CausalLM:
    """TransNormerLLM: `CausalLM` with a GLA mixer per layer (LRPE on `lrpe_layers`, default layer 0 only).
    Runs of layers with and without LRPE are scanned segments (default: layer 0, then layers 1..L-1).
    `context_parallel`: 'lasp2' or None, see `GLA`; `scan_layers`, `remat`, `dtype`, `param_dtype`: see
    `CausalLM`."""
    cp.check_strategy(context_parallel, "transnormer")
    lrpe_layers = frozenset(lrpe_layers)

    def mixer(i, r):
        return GLA(d_model, num_heads, use_lrpe=i in lrpe_layers, rngs=r, block_size=block_size,
                   implementation=implementation, context_parallel=context_parallel, dtype=dtype,
                   param_dtype=param_dtype)
    return CausalLM(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, glu_dim=glu_dim,
                    mixer_factory=mixer, rngs=rngs, mixer_group=lambda i: i in lrpe_layers,
                    mixer_constants=lambda i: jaxattn.lightning_slopes(num_heads, i, num_layers),
                    scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=param_dtype)
