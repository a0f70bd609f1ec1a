"""Halo attention's per-tile attention written densely, with the relative logits added inside the logits, run
over small chunks of tiles.

The tiled path (`xla.py`) builds the relative logits as a separate additive bias `[tiles, N, T, win*win]` and
hands it to the blocked `dot_product_attention`, which reads it back per key block, transposes the tiles to its
own layout and keeps an online softmax -- for windows of a few hundred keys all of that is overhead. Here the
logits `[tiles, N, bq, bq, win, win]` are one batched matmul, the two per-axis relative terms `[.., bq, bq, win]`
are broadcast-added into them in the same fused loop as the softmax, and autodiff's backward reduces the logit
gradient back onto those terms (a sum over one window axis each) instead of materialising a bias gradient.
Done over all tiles at once this is memory-bound (HaloNet-H1 stage 1: each `[512, 8, 64, 196]` fp32 pass is
205 MB, for 2.6 MFLOP per tile and head) and no faster than the tiled path. `chunked_tile_attention` therefore
runs it over chunks of a few tiles (`lax.map`, `CHUNK_BYTES` of logits each, so they stay in cache) under
`jax.checkpoint`: the backward recomputes each chunk's logits instead of keeping them. Measured on XLA:CPU,
forward + backward of HaloNet-H1's attentions (batch 8, CPU ms, tiled -> chunked): 64 px map, head dim 8:
466 -> 258; 32 px, dim 32, query stride 2: 83 -> 66; 16 px, dim 32: 64 -> 35. Nothing `[tiles, N, T, S]` is
stored for the backward.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxattn.halo.relative import axis_logits

# None takes this path ('small_windows') on CPU for windows up to this many keys (the blocked path keeps larger
# ones bounded).
DENSE_MAX_KEYS = 1024
CHUNK_BYTES = 3 << 19  # fp32 logits per chunk of tiles (1.5 MiB: 2-8 tiles of HaloNet-H1 measured best)


def dense_tile_attention(q, k, v, rel_height, rel_width, mask, *, scale):
    """`q [Bt, bq, bq, N, D]`, `k [Bt, win*win, N, D]`, `v [Bt, win*win, N, Dv]` (windows row-major), tables
    `[2*win - 1, D]` or None, `mask` None or boolean, broadcastable to `[Bt, 1, 1, win*win]` (True = attend;
    every query must keep one key) -> `[Bt, bq*bq, N, Dv]`.

    `logits = scale * q.k + q.rel_height[ky - qy + win - 1] + q.rel_width[kx - qx + win - 1]`, softmax in fp32."""
    bt, bq, _, n, _ = q.shape
    s = k.shape[1]
    win = math.isqrt(s)
    logits = jnp.einsum("byxnd,bknd->bnyxk", q, k, preferred_element_type=jnp.float32) * scale
    logits = logits.reshape(bt, n, bq, bq, win, win)
    height, width = axis_logits(q, rel_height, rel_width, win)
    if height is not None:  # query row qy, key row ky
        logits = logits + height[..., :, None]
    if width is not None:  # query column qx, key column kx
        logits = logits + width[..., None, :]
    logits = logits.reshape(bt, n, bq * bq, s)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(c for c in range(1, max(1, min(n, limit)) + 1) if n % c == 0)


def chunked_tile_attention(q, k, v, rel_height, rel_width, mask, *, scale, chunk_bytes=None):
    """`dense_tile_attention` (same arguments and result) over chunks of tiles, each recomputed in the backward.

    Chunks hold `chunk_bytes` (default `CHUNK_BYTES`) of fp32 logits, rounded down to a divisor of the tile
    count."""
    bt, bq, _, n, _ = q.shape
    per_tile = n * bq * bq * k.shape[1] * 4
    c = _largest_divisor_at_most(bt, (chunk_bytes or CHUNK_BYTES) // per_tile)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (bt, *mask.shape[1:]))

    def chunks(x):
        return None if x is None else x.reshape(bt // c, c, *x.shape[1:])

    @jax.checkpoint
    def one(parts):
        return dense_tile_attention(*parts[:3], rel_height, rel_width, parts[3], scale=scale)

    out = jax.lax.map(one, (chunks(q), chunks(k), chunks(v), chunks(mask)))
    return out.reshape(bt, *out.shape[2:])
