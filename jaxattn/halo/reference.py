"""Obviously-correct halo attention: a literal re-derivation of timm's `HaloAttn` forward (timm/layers/halo_attn.py),
in fp32, on already-projected heads-last q/k/v. Used as the ground truth of the tests.

timm's steps, reproduced one by one:
1. queries: `[B, N, blocks, bq*bq, D]`, blocks row-major, tokens row-major inside a block;
2. keys/values: zero-pad the map by `halo` and unfold `win = block + 2*halo` windows with step `block`
   (here: an explicit index gather of each window, the most literal form);
3. logits `(q @ k^T) * scale + rel_logits(q)`, where `rel_logits` is `PosEmbedRel` with its pad-flatten
   "relative to absolute" trick of `rel_logits_1d`, once per axis;
4. softmax over the whole window (padded zeros included unless `mask_padding`), `@ v`, fold back.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rel_logits_1d(q, rel_k, permute):
    """timm's `rel_logits_1d`: `q [B', h, w, D]`, `rel_k [2*win - 1, D]` -> `[B', h, w, win, win]` permuted."""
    bp, hb, wb, _ = q.shape
    rel_size = rel_k.shape[0]
    win = (rel_size + 1) // 2
    x = (q @ rel_k.T).reshape(-1, wb, rel_size)
    # Pad-and-reshape shifts row i of the relative logits left by i: relative -> absolute indexing.
    x_pad = jnp.pad(x, ((0, 0), (0, 0), (0, 1))).reshape(x.shape[0], -1)
    x_pad = jnp.pad(x_pad, ((0, 0), (0, rel_size - wb)))
    x = x_pad.reshape(-1, wb + 1, rel_size)[:, :wb, win - 1:]
    x = jnp.broadcast_to(x.reshape(bp, hb, 1, wb, win), (bp, hb, win, wb, win))
    return x.transpose(permute)


def pos_embed_rel(q, rel_height, rel_width, block):
    """timm's `PosEmbedRel.forward`: `q [B, blocks, block*block, D]` -> `[B, blocks, block*block, win*win]`."""
    b, nb, t, d = q.shape
    q = q.reshape(-1, block, block, d)
    logits = 0.0
    if rel_width is not None:
        logits = logits + rel_logits_1d(q, rel_width, (0, 1, 3, 2, 4))
    if rel_height is not None:
        logits = logits + rel_logits_1d(q.transpose(0, 2, 1, 3), rel_height, (0, 3, 1, 4, 2))
    return jnp.reshape(logits, (b, nb, t, -1))


def _unfold(x, block, halo):
    """`[B, H, W, N, D]` -> `[B, N, blocks, win*win, D]`: timm's pad + `unfold(2, win, block).unfold(3, ...)`."""
    b, h, w, n, d = x.shape
    win = block + 2 * halo
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)))
    rows = (jnp.arange(h // block) * block)[:, None] + jnp.arange(win)  # [nh, win]
    cols = (jnp.arange(w // block) * block)[:, None] + jnp.arange(win)  # [nw, win]
    windows = xp[:, rows[:, None, :, None], cols[None, :, None, :]]  # [B, nh, nw, win, win, N, D]
    return windows.reshape(b, -1, win * win, n, d).transpose(0, 3, 1, 2, 4)


def _padding_mask(h, w, block, halo):
    """`[blocks, win*win]`, True where the window position lies inside the (unpadded) map."""
    win = block + 2 * halo

    def axis(length):
        pos = (jnp.arange(length // block) * block)[:, None] + jnp.arange(win) - halo
        return (pos >= 0) & (pos < length)

    return (axis(h)[:, None, :, None] & axis(w)[None, :, None, :]).reshape(-1, win * win)


def halo_attention_reference(query, key, value, rel_height, rel_width, *, block_size, halo_size, query_stride,
                             scale, mask_padding):
    """Returns `[B, H/s, W/s, N, Dv]` in the query dtype (see `jaxattn.halo_attention`)."""
    b, hq, wq, n, d = query.shape
    h, w, dv = value.shape[1], value.shape[2], value.shape[-1]
    bq = block_size // query_stride
    nh, nw = h // block_size, w // block_size
    q = query.astype(jnp.float32).reshape(b, nh, bq, nw, bq, n, d).transpose(0, 5, 1, 3, 2, 4, 6)
    q = q.reshape(b * n, nh * nw, bq * bq, d)
    k = _unfold(key, block_size, halo_size).reshape(b * n, nh * nw, -1, d)
    v = _unfold(value, block_size, halo_size).reshape(b * n, nh * nw, -1, dv)
    logits = (q @ k.swapaxes(-1, -2)) * scale
    if rel_height is not None or rel_width is not None:
        as_f32 = (lambda t: None if t is None else t.astype(jnp.float32))
        logits = logits + pos_embed_rel(q, as_f32(rel_height), as_f32(rel_width), bq)
    if mask_padding:
        logits = jnp.where(_padding_mask(h, w, block_size, halo_size)[:, None, :], logits, -jnp.inf)
    out = jax.nn.softmax(logits, axis=-1) @ v  # [B*N, blocks, bq*bq, Dv]
    out = out.reshape(b, n, nh, nw, bq, bq, dv).transpose(0, 2, 4, 3, 5, 1, 6)
    return out.reshape(b, hq, wq, n, dv).astype(query.dtype)
