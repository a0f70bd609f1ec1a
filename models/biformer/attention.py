"""BiFormer's token mixers: bi-level routing attention (BRA) and global attention with LePE.

Both keep heads as their own dim from the qkv projection to the output projection, and constrain the per-head
tensors to `(BATCH, ..., HEADS, HEAD_DIM)`: under `tensor` parallelism each device computes its heads (routing
included: region means are per-head slices summed over the contraction, one small reduction), and the output
projection's row-parallel matmul ends in the block's one all-reduce.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.models.layers import axes

from .layers import Projection, depthwise

IMAGE_HEADS = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.HEADS, axes.HEAD_DIM)
TOKEN_HEADS = (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM)
IMAGE = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED)


def _pad_to_multiple(x, multiple: int):
    h, w = x.shape[1:3]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return x


class BiLevelRoutingAttention(nnx.Module):
    """BRA block attention (`kv_downsample_mode='identity'`, hard non-differentiable routing, `param_attention
    ='qkvo'`). `[B, H, W, dim] -> [B, H, W, dim]`; `num_heads` heads of `qk_dim / num_heads` (q, k) and
    `dim / num_heads` (v) channels.

    Parameters: `qkv` `[dim, heads, 2 * dq + dv]` (the reference's fused Linear regrouped per head, see
    `layers.fused_qkv_per_head`), `wo` `[heads, dv, dim]`, `lepe` the 5x5 depthwise conv (LCE) of v.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, *, qk_dim: int | None = None,
                 qk_scale: float | None = None, side_dwconv: int = 5, auto_pad: bool = False,
                 implementation: str | None = None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dim, self.qk_dim = dim, qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"`qk_dim` ({self.qk_dim}) and `dim` ({dim}) must be divisible by `num_heads` "
                             f"({num_heads})")
        self.num_heads, self.n_win, self.topk = num_heads, n_win, topk
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.auto_pad, self.implementation = auto_pad, implementation
        dq, dv = self.qk_dim // num_heads, dim // num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Projection((dim,), (num_heads, 2 * dq + dv), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), **kw)
        self.wo = Projection((num_heads, dv), (dim,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), **kw)
        self.lepe = (depthwise(dim, side_dwconv, param_dtype=param_dtype, rngs=rngs) if side_dwconv > 0
                     else nnx.data(None))

    def __call__(self, x):
        b, h, w, _ = x.shape
        if self.auto_pad:
            x = _pad_to_multiple(x, self.n_win)
        hp, wp = x.shape[1:3]
        n, dq = self.num_heads, self.qk_dim // self.num_heads
        qkv = axes.constrain(self.qkv(x), IMAGE_HEADS)  # [B, H, W, heads, 2 dq + dv]
        q, k, v = qkv[..., :dq], qkv[..., dq:2 * dq], qkv[..., 2 * dq:]
        out = jaxattn.bilevel_routing_attention(q, k, v, self.n_win, self.topk, scale=self.scale,
                                                implementation=self.implementation)
        if self.lepe is not None:  # LCE on v at full resolution
            out = out + self.lepe(v.reshape(b, hp, wp, self.dim)).reshape(v.shape)
        out = axes.constrain(out, IMAGE_HEADS)
        return self.wo(out)[:, :h, :w]


class AttentionLePE(nnx.Module):
    """Global multi-head attention (`_common.Attention` / `AttentionLePE`): qkv without bias, scale
    `(dim / num_heads) ** -0.5`, plus a depthwise conv of the attention input (LePE) when `side_dwconv > 0`.

    Parameters: `qkv` `[dim, 3, heads, head_dim]` (the reference's `[3 * dim, dim]` weight reshaped), `proj`
    `[heads, head_dim, dim]`.
    """

    def __init__(self, dim: int, *, num_heads: int = 8, side_dwconv: int = 5, implementation: str | None = None,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by the global attention's {num_heads} heads")
        self.num_heads, self.implementation = num_heads, implementation
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = dim // num_heads
        self.qkv = Projection((dim,), (3, num_heads, hd), (axes.EMBED, None, axes.HEADS, axes.HEAD_DIM),
                              use_bias=False, **kw)
        self.proj = Projection((num_heads, hd), (dim,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), **kw)
        self.lepe = (depthwise(dim, side_dwconv, param_dtype=param_dtype, rngs=rngs) if side_dwconv > 0
                     else nnx.data(None))

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(x.reshape(b, h * w, c))  # [B, L, 3, heads, head_dim]
        q, k, v = (axes.constrain(qkv[:, :, i], TOKEN_HEADS) for i in range(3))
        out = jaxattn.dot_product_attention(q, k, v, implementation=self.implementation)
        out = axes.constrain(out, TOKEN_HEADS).reshape(b, h, w, self.num_heads, -1)
        if self.lepe is not None:
            out = out + self.lepe(x).reshape(out.shape)
        return self.proj(out)
