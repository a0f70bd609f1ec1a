"""Region-level routing shared by every path of bi-level routing attention (BiFormer `TopkRouting`).

Regions are the `Sh x Sw` windows of the map, numbered row-major (`(j i)` in BiFormer's einops patterns).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.core import image_tiles


def region_window(image_hw, num_regions):
    """Pixel size `(H/Sh, W/Sw)` of one region."""
    return image_hw[0] // num_regions[0], image_hw[1] // num_regions[1]


def to_regions(x, num_regions):
    """`[B, H, W, *rest]` -> `[B, Sh*Sw, region_tokens, *rest]`."""
    return image_tiles.to_windows(x, region_window(x.shape[1:3], num_regions))


def from_regions(x, num_regions, image_hw):
    return image_tiles.from_windows(x, region_window(image_hw, num_regions), image_hw)


def select_regions(query, key, num_regions, topk, scale):
    """Indices `[B, Sh*Sw, topk]` (int32) of the `topk` key regions routed to each query region.

    Region queries/keys are the means of q and k over each region, taken from detached tensors (BiFormer's
    `diff_routing=False`), flattened over heads (`[N * D]`, all heads route together). The affinity is
    `(q_r * scale) @ k_r^T`; the routing weights (its softmax) are unused, so only the selection matters. Computed
    in fp32 at full matmul precision so a port makes the same choices as the reference framework.
    """
    def means(x):
        r = to_regions(jax.lax.stop_gradient(x).astype(jnp.float32), num_regions)
        return jnp.mean(r, axis=2).reshape(r.shape[0], r.shape[1], -1)

    affinity = jnp.einsum("brc,bsc->brs", means(query) * scale, means(key), precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(affinity, topk)[1].astype(jnp.int32)
