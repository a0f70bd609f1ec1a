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
from jaxattn.models.layers import precision
from jaxattn.models.layers.agent_attention import AgentAttention
from jaxattn.models.layers.dense import Dense
from jaxattn.models.layers.drop_path import DropPath

LN_EPS = 1e-6  # timm ViT / DeiT


def _dense(d_in, d_out, *, dtype, rngs):
    return Dense(d_in, d_out, kernel_init=nnx.initializers.truncated_normal(0.02), dtype=dtype, rngs=rngs)


class AgentBlock(nnx.Module):
    """Pre-norm block: `AgentAttention` then a GELU MLP, each residual with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], *, agent_grid: int, mlp_ratio: float,
                 drop_path: float = 0.0, implementation: str | None = None, dtype=None, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.attn = AgentAttention(dim, num_heads, grid, agent_grid=agent_grid, implementation=implementation,
                                   dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        hidden = int(dim * mlp_ratio)
        self.fc1 = _dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _dense(hidden, dim, dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)))


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
      dtype: compute dtype (parameters stay float32).
    """

    def __init__(self, *, num_classes: int = 1000, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 64, depth: int = 2, num_heads: int = 2, mlp_ratio: float = 4.0,
                 agent_grid: int = 4, drop_path_rate: float = 0.0, implementation: str | None = None,
                 dtype=None, rngs: nnx.Rngs):
        dtype = precision.check_dtype("dtype", dtype, allow_none=True)
        if img_size % patch_size:
            raise ValueError(f"`img_size` ({img_size}) must be a multiple of `patch_size` ({patch_size})")
        side = img_size // patch_size
        self.img_size, self.in_chans, self.num_features = img_size, in_chans, embed_dim
        self.patch_embed = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size), strides=(patch_size, patch_size),
                                    padding="VALID", dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                                                      (1, side, side, embed_dim)))
        rates: Sequence[float] = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nnx.List([AgentBlock(embed_dim, num_heads, (side, side), agent_grid=agent_grid,
                                           mlp_ratio=mlp_ratio, drop_path=rate, implementation=implementation,
                                           dtype=dtype, rngs=rngs) for rate in rates])
        self.norm = nnx.LayerNorm(embed_dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.head = _dense(embed_dim, num_classes, dtype=dtype, rngs=rngs) if num_classes > 0 else nnx.data(None)
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
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        features = self.norm(x).mean(axis=(1, 2))
        return features if self.head is None else self.head(features)

    def _taps(self):
        def run(i, block):
            def tap(x):
                x = block(self.embed(x) if i == 0 else x)
                return x, x
            return tap
        return [run(i, block) for i, block in enumerate(self.blocks)]

    def _prune(self, num_taps: int) -> list[str]:
        removed = [f"blocks.{i}." for i in range(num_taps, len(self.blocks))]
        self.blocks = nnx.List(list(self.blocks)[:num_taps])
        return removed
