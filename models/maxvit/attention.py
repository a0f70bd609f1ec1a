"""MaxViT's transformer half: the TF-style relative position bias and the block/grid attention + FFN layer.

Semantics follow timm's `maxvit_*_tf` models (`_tf_cfg`), which load the official TensorFlow weights:
- channels-last pre-norm layers, LayerNorm eps 1e-5, GELU (tanh approximation) FFN with expansion 4;
- qkv from one Linear whose output channels are ordered `[3, heads, head_dim]` (timm `head_first=False`), stored
  as a `[C, 3, heads, head_dim]` kernel (and the output projection as `[heads, head_dim, C]`) so that the `tensor`
  mesh axis splits heads, Megatron-style, instead of cutting across q, k and v;
- relative position bias `bias_tf`: one table `[heads, 2p-1, 2p-1]` per layer, read at `key - query + p - 1`
  (note: key minus query, the opposite sign of Swin's table).
The attention itself is `jaxattn.block_attention` / `jaxattn.grid_attention`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxattn
from jaxattn.models.layers import DropPath, axes
from jaxattn.models.layers.dense import Dense, DenseGeneral

LN_EPS = 1e-5
RESIZE_METHODS = ("bilinear", "bicubic")
# Logical names of channels-last activations: the residual stream, per-head tensors, MLP hidden units.
IMAGE = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED)
IMAGE_HEADS = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.HEADS, axes.HEAD_DIM)
IMAGE_MLP = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.MLP)


def _pair(name, value) -> tuple[int, int]:
    value = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"`{name}` must be a positive int or a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def rel_pos_index(size) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices into a `[2ph-1, 2pw-1]` table for every (query, key) pair of a `ph x pw` tile.

    Returns two int arrays broadcastable to `[ph, pw, ph, pw]` (query row, query col, key row, key col):
    `key_row - query_row + ph - 1` and `key_col - query_col + pw - 1` (TF MaxViT's one-hot lookup).
    """
    ph, pw = _pair("size", size)
    rows = np.arange(ph)[None, :] - np.arange(ph)[:, None] + ph - 1  # [query, key]
    cols = np.arange(pw)[None, :] - np.arange(pw)[:, None] + pw - 1
    return rows[:, None, :, None], cols[None, :, None, :]


def expand_rel_pos_bias(table, size):
    """`table [N, 2ph-1, 2pw-1]` -> additive logits `[N, ph*pw, ph*pw]` (row-major tokens inside a tile)."""
    ph, pw = _pair("size", size)
    if table.ndim != 3 or table.shape[1:] != (2 * ph - 1, 2 * pw - 1):
        raise ValueError(f"`table` must be [heads, {2 * ph - 1}, {2 * pw - 1}] for a {ph}x{pw} tile, "
                         f"got shape {tuple(table.shape)}")
    rows, cols = rel_pos_index((ph, pw))
    return table[:, rows, cols].reshape(table.shape[0], ph * pw, ph * pw)


def resize_rel_pos_bias(table, size, *, method: str = "bilinear"):
    """Resizes a `[N, 2p-1, 2q-1]` table (numpy or jax, any leading shape) to tile size `size`.

    For loading weights trained at one resolution into a model with another window/grid size (e.g. 224-px
    weights, window 7, into a 384-px model, window 12). `'bilinear'` (default) is what the official MaxViT code
    does when fine-tuning at a new size (`tf.image.resize`, half-pixel centres, no antialiasing); `'bicubic'`
    approximates timm's `resize_rel_pos_bias_table` (PyTorch bicubic; borders differ slightly).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"`method` must be one of {RESIZE_METHODS}, got {method!r}")
    ph, pw = _pair("size", size)
    table = jnp.asarray(table)
    if table.ndim < 2:
        raise ValueError(f"`table` must be [..., 2p-1, 2q-1], got shape {tuple(table.shape)}")
    target = table.shape[:-2] + (2 * ph - 1, 2 * pw - 1)
    if target == table.shape:
        return table
    resized = jax.image.resize(table.astype(jnp.float32), target, "linear" if method == "bilinear" else "cubic",
                               antialias=False)
    return resized.astype(table.dtype)


class RelPosBias(nnx.Module):
    """Learned per-head relative position bias of a `ph x pw` tile; `__call__()` gives `[N, T, T]` logits."""

    def __init__(self, num_heads: int, size, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.size = _pair("size", size)
        ph, pw = self.size
        init = nnx.initializers.normal(0.02)
        self.relative_position_bias_table = nnx.Param(
            init(rngs.params(), (num_heads, 2 * ph - 1, 2 * pw - 1), param_dtype),
            **axes.param_metadata((axes.HEADS, None, None)))

    def __call__(self):
        return expand_rel_pos_bias(self.relative_position_bias_table[...], self.size)


def layer_norm(dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    # Two-pass variance, as PyTorch computes it (E[x^2] - E[x]^2 loses digits when |mean| >> std).
    norm = axes.param_metadata((axes.NORM,))
    return nnx.LayerNorm(dim, epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                         scale_metadata=norm, bias_metadata=norm, rngs=rngs)


def _dense(din, dout, names, rngs, dtype, param_dtype):
    return Dense(din, dout, names=names, kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)


class Mlp(nnx.Module):
    """`fc2(gelu(fc1(x)))`; the hidden units split over `tensor` (fc1 by columns, fc2 by rows)."""

    def __init__(self, dim: int, hidden: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = _dense(dim, hidden, (axes.EMBED, axes.MLP), rngs, dtype, param_dtype)
        self.fc2 = _dense(hidden, dim, (axes.MLP, axes.EMBED), rngs, dtype, param_dtype)

    def __call__(self, x):
        hidden = axes.constrain(jax.nn.gelu(self.fc1(x), approximate=True), IMAGE_MLP)
        return self.fc2(hidden)


class PartitionAttention(nnx.Module):
    """`x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))` on channels-last `[B, H, W, C]`.

    `partition='block'`: attention inside non-overlapping `p x p` windows; `'grid'`: among the `g x g` tokens
    spaced `H/g` apart. `H` and `W` must be multiples of `size` (the model checks image sizes up front).
    `implementation=None` lets the op pick for the lowering platform (on CPU, tiles of <= 64 tokens take its
    'small_tiles' backend).
    """

    def __init__(self, dim: int, *, partition: str, size, head_dim: int = 32, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, implementation=None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if partition not in ("block", "grid"):
            raise ValueError(f"`partition` must be 'block' or 'grid', got {partition!r}")
        if dim % head_dim:
            raise ValueError(f"channels ({dim}) must be a multiple of `head_dim` ({head_dim})")
        self.partition, self.size = partition, _pair("size", size)
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.implementation = implementation
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, **kw)
        heads = (self.num_heads, head_dim)
        self.qkv = DenseGeneral((dim,), (3,) + heads, (axes.EMBED, None, axes.HEADS, axes.HEAD_DIM), **kw)
        self.rel_pos = RelPosBias(self.num_heads, self.size, param_dtype=param_dtype, rngs=rngs)
        self.proj = DenseGeneral(heads, (dim,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), **kw)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def attention(self, x):
        qkv = self.qkv(x)  # [B, H, W, 3, heads, head_dim]
        q, k, v = (axes.constrain(qkv[:, :, :, i], IMAGE_HEADS) for i in range(3))
        op = jaxattn.block_attention if self.partition == "block" else jaxattn.grid_attention
        bias = self.rel_pos().astype(q.dtype)
        out = op(q, k, v, self.size, bias=bias, implementation=self.implementation)
        return self.proj(axes.constrain(out, IMAGE_HEADS))

    def __call__(self, x):
        x = axes.constrain(x + self.drop_path1(self.attention(self.norm1(x))), IMAGE)
        return axes.constrain(x + self.drop_path2(self.mlp(self.norm2(x))), IMAGE)
