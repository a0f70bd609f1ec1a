"""MaxViT block/grid attention as a tiling (reshape + transpose, no gather) around `dot_product_attention`.

Each tile is an independent batch entry of dense attention over `T = p*p` tokens, so the memory-lean blocked
path (and any kernel registered for dot-product attention) does the work; the bias `[N, T, T]` is broadcast over
tiles, never copied.
"""
from __future__ import annotations

from jaxattn.core import image_tiles
from jaxattn.dot_product import dot_product_attention

TILINGS = {"block": (image_tiles.to_windows, image_tiles.from_windows),  # partition -> (split, merge)
           "grid": (image_tiles.to_grid, image_tiles.from_grid)}


def partition_attention_xla(query, key, value, bias, *, partition, size, scale):
    """`[B, H, W, N, D]` q/k/v -> `[B, H, W, N, Dv]`; `bias` broadcastable to `[N, T, T]`."""
    split, merge = TILINGS[partition]
    b, h, w = query.shape[:3]

    def tiles(x):  # [B, H, W, N, D] -> [B * tiles, T, N, D]
        t = split(x, size)
        return t.reshape(-1, *t.shape[2:])

    out = dot_product_attention(tiles(query), tiles(key), tiles(value), bias, scale=scale)
    return merge(out.reshape(b, -1, *out.shape[1:]), size, (h, w))
