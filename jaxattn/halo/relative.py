"""HaloNet's relative logits (timm's `rel_logits_1d`), shared by the tiled and the dense per-tile paths.

Each query of a `bq x bq` block meets a `win x win` key window; its relative logit for key `(ky, kx)` is
`q . rel_height[ky - qy + win - 1] + q . rel_width[kx - qx + win - 1]`. Per axis that is a matmul of the queries
with the *gathered table* (`[bq, win, D]`), never with the map.
"""
from __future__ import annotations

import jax.numpy as jnp


def rel_offsets(query_block, win):
    """Table row used by the query at block coordinate `i` for the key at window coordinate `j`: `[bq, win]`.

    timm's `rel_logits_1d` maps relative logits onto the window with `j - i + win - 1` (stride-2 blocks use the
    subsampled query coordinate `i`).
    """
    return jnp.arange(win)[None, :] - jnp.arange(query_block)[:, None] + win - 1


def axis_logits(q_tiles, rel_height, rel_width, win):
    """The two per-axis terms for `q [Bt, bq, bq, N, D]`: `(height, width)`, each `[Bt, N, bq, bq, win]` fp32 or
    None where its table is None. `height[b, n, qy, qx, ky]` and `width[b, n, qy, qx, kx]`; the logit of key
    `(ky, kx)` is their sum."""
    offsets = rel_offsets(q_tiles.shape[1], win)

    def along(spec, table):
        if table is None:
            return None
        return jnp.einsum(spec, q_tiles, table[offsets].astype(q_tiles.dtype), preferred_element_type=jnp.float32)

    return along("byxnd,ykd->bnyxk", rel_height), along("byxnd,xkd->bnyxk", rel_width)
