"""An isotropic vision transformer whose token mixer is `models/layers/agent_attention.AgentAttention`.

    patch_embed: conv p x p stride p -> [B, H/p, W/p, C], plus a learned position embedding
    blocks[i]:   x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))   (pre-norm, GELU MLP)
    norm, global average pool, head

Agent-DeiT (Han et al. 2024) without the class token: the agents pool the whole map, so the model works on maps of
the size it was built for (`img_size / patch_size`). Not a published configuration; for tests and small runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.features import Backbone, FeatureSpec
from jaxattn.models.layers import axes, precision
from jaxattn.models.layers.agent_attention import AgentAttention
from jaxattn.models.layers.dense import Dense
from jaxattn.models.layers.drop_path import DropPath
from jaxattn.models.layers.remat import check_remat
from jaxattn.models.layers.stack import Stack

LN_EPS = 1e-6  # timm ViT / DeiT


IMAGE = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED)  # the residual stream at block boundaries


def _dense(d_in, d_out, names, *, dtype, param_dtype, rngs):
    return Dense(d_in, d_out, names=names, kernel_init=nnx.initializers.truncated_normal(0.02), dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)


def _norm(dim, *, dtype, param_dtype, rngs):
    norm_names = dict(scale_metadata=axes.param_metadata((axes.NORM,)),
                      bias_metadata=axes.param_metadata((axes.NORM,)))
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **norm_names)


class AgentBlock(nnx.Module):
    """Pre-norm block: `AgentAttention` then a GELU MLP, each residual with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], *, agent_grid: int, mlp_ratio: float,
                 drop_path=0.0, implementation: str | None = None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _norm(dim, **kw)
        self.attn = AgentAttention(dim, num_heads, grid, agent_grid=agent_grid, implementation=implementation, **kw)
        self.norm2 = _norm(dim, **kw)
        hidden = int(dim * mlp_ratio)
        self.fc1 = _dense(dim, hidden, (axes.EMBED, axes.MLP), **kw)
        self.fc2 = _dense(hidden, dim, (axes.MLP, axes.EMBED), **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        hidden = axes.constrain(self.fc1(self.norm2(x)), (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.MLP))
        gelu = jax.nn.gelu(hidden.astype(jnp.float32), approximate=False).astype(hidden.dtype)
        return axes.constrain(x + self.drop_path(self.fc2(gelu)), IMAGE)


class AgentViT(Backbone, nnx.Module):
    """NHWC images `[B, img, img, in_chans]` -> logits `[B, num_classes]` (pooled features if `num_classes=0`).
    As a backbone (`models/features.py`) each block's output is a feature (stride `patch_size`, timm ViT's).

    Args:
      img_size, patch_size: the token map is `img_size // patch_size` square; images of another size are a
        ValueError (the agent biases are sized for the map).
      embed_dim, depth, num_heads, mlp_ratio: the transformer.
      agent_grid: `p`, agents per block `p x p` (pooled from the queries).
      drop_path_rate: stochastic depth, linear in the block index up to this rate.
      implementation: passed to `jaxattn.agent_attention`.
      dtype, param_dtype: compute and storage dtypes (`models/layers/precision.py`).
      remat: rematerialisation policy per block (`models/layers/remat.py`).
      scan_blocks: scan the blocks (one compiled block); False (the default, this test model has 2) unrolls
        them, which the backbone taps (one per block) need.
    """

    def __init__(self, *, num_classes: int = 1000, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 64, depth: int = 2, num_heads: int = 2, mlp_ratio: float = 4.0,
                 agent_grid: int = 4, drop_path_rate: float = 0.0, implementation: str | None = None,
                 dtype=None, param_dtype=jnp.float32, remat: str = "none", scan_blocks: bool = False,
                 rngs: nnx.Rngs):
        dtype = precision.check_dtype("dtype", dtype, allow_none=True)
        param_dtype = precision.check_dtype("param_dtype", param_dtype)
        check_remat(remat)
        if img_size % patch_size:
            raise ValueError(f"`img_size` ({img_size}) must be a multiple of `patch_size` ({patch_size})")
        side = img_size // patch_size
        self.img_size, self.in_chans, self.num_features = img_size, in_chans, embed_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        conv_names = (axes.CONV_KERNEL, axes.CONV_KERNEL, axes.CONV_IN, axes.EMBED)
        self.patch_embed = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size), strides=(patch_size, patch_size),
                                    padding="VALID", kernel_metadata=axes.param_metadata(conv_names),
                                    bias_metadata=axes.param_metadata((axes.EMBED,)), **kw)
        pos = 0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (1, side, side, embed_dim))
        self.pos_embed = nnx.Param(pos.astype(param_dtype), **axes.param_metadata((None, None, None, axes.EMBED)))
        rates: Sequence[float] = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]

        def make_block(r, rate):
            return AgentBlock(embed_dim, num_heads, (side, side), agent_grid=agent_grid, mlp_ratio=mlp_ratio,
                              drop_path=rate, implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                              rngs=r)
        self.blocks = Stack(make_block, depth, rngs=rngs, scan=scan_blocks, remat=remat, block_args=(rates,))
        self.norm = _norm(embed_dim, **kw)
        self.head = (_dense(embed_dim, num_classes, (axes.EMBED, axes.VOCAB), **kw) if num_classes > 0
                     else nnx.data(None))
        self.norm_attr, self.head_attr = ("norm", "norm."), ("head", "head.")
        self.feature_specs = tuple(FeatureSpec(embed_dim, patch_size, f"blocks.{i}", i) for i in range(depth))

    def check_images(self, images) -> None:
        want = (self.img_size, self.img_size, self.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"`images` must be NHWC [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(images.shape)}")

    def embed(self, images):
        x = self.patch_embed(images)
        return x + self.pos_embed[...].astype(x.dtype)

    def __call__(self, images):
        self.check_images(images)
        x = self.blocks(axes.constrain(self.embed(images), IMAGE))
        features = self.norm(x).astype(jnp.float32).mean(axis=(1, 2))
        return features if self.head is None else self.head(features)

    def _unrolled(self) -> nnx.List:
        if self.blocks.scan:
            raise ValueError("the backbone API taps every block: build the model with `scan_blocks=False`")
        return self.blocks.blocks

    def _taps(self):
        def run(i, block):
            def tap(x):
                x = block(self.embed(x) if i == 0 else x)
                return x, x
            return tap
        return [run(i, block) for i, block in enumerate(self._unrolled())]

    def _prune(self, num_taps: int) -> list[str]:
        blocks = self._unrolled()
        removed = [f"blocks.{i}." for i in range(num_taps, len(blocks))]
        self.blocks.blocks = nnx.List(list(blocks)[:num_taps])
        self.blocks.n = num_taps
        return removed
