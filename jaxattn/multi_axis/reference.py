"""Obviously-correct MaxViT block/grid attention, written as timm's `window_partition` / `grid_partition` on the
channels-last map `[B, H, W, C]` (C = heads * head_dim, heads outermost) followed by per-tile softmax attention in
fp32. Deliberately independent of `jaxattn.core.image_tiles`, which the tests check against it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _window_partition(x, p):
    b, h, w, c = x.shape
    x = x.reshape(b, h // p[0], p[0], w // p[1], p[1], c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, p[0], p[1], c)


def _window_reverse(x, p, hw):
    h, w = hw
    x = x.reshape(-1, h // p[0], w // p[1], p[0], p[1], x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, x.shape[-1])


def _grid_partition(x, g):
    b, h, w, c = x.shape
    x = x.reshape(b, g[0], h // g[0], g[1], w // g[1], c).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, g[0], g[1], c)


def _grid_reverse(x, g, hw):
    h, w = hw
    x = x.reshape(-1, h // g[0], w // g[1], g[0], g[1], x.shape[-1]).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, h, w, x.shape[-1])


_PARTITIONS = {"block": (_window_partition, _window_reverse), "grid": (_grid_partition, _grid_reverse)}


def partition_attention_reference(query, key, value, bias, *, partition, size, scale):
    """`[B, H, W, N, D]` q/k/v -> `[B, H, W, N, Dv]` in the query dtype; `bias` broadcastable to `[N, T, T]`."""
    split, merge = _PARTITIONS[partition]
    b, h, w, n, _ = query.shape

    def tiles(x):  # [B, H, W, N, D] -> [tiles, N, T, D]
        t = split(x.astype(jnp.float32).reshape(b, h, w, -1), size)
        return t.reshape(t.shape[0], -1, n, x.shape[-1]).transpose(0, 2, 1, 3)

    q, k, v = tiles(query), tiles(key), tiles(value)
    logits = jnp.einsum("bntd,bnsd->bnts", q * scale, k)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    out = jnp.einsum("bnts,bnsd->bntd", jax.nn.softmax(logits, axis=-1), v)
    out = out.transpose(0, 2, 1, 3).reshape(out.shape[0], size[0], size[1], -1)
    return merge(out, size, (h, w)).reshape(b, h, w, n, -1).astype(query.dtype)
