"""Halo attention as tiles (reshapes and static slices, no gather of the map) around `dot_product_attention`.

- Query blocks: a window tiling of the (possibly subsampled) query map.
- Key/value windows: the map is zero-padded and cut into rows of `block` pixels; the `win = block + 2*halo` window
  of block `i` is the concatenation of the `ceil(win / block)` consecutive row-blocks starting at `i`, trimmed.
  Done per axis, this is a handful of static slices (one fused copy), like timm's `unfold`.
- Relative logits `q . rel_h[ky - qy + win - 1] + q . rel_w[kx - qx + win - 1]` (timm's rel-to-abs indexing)
  are computed per axis (`relative.axis_logits`, `[tiles, N, bq, bq, win]`: each query against the `win` row /
  column offsets, a matmul with the gathered *table*, never the map) and broadcast-added into the additive bias
  `[tiles, N, T, win*win]` of the tile attention. (Folding them into the dot product instead, as extra one-hot
  channels on q and k, was measured too: it saves a little forward memory for tiny head dims but costs more in
  forward+backward.)
- `small_windows=True` (the op's 'small_windows' backend, None's choice on CPU for windows of at most
  `dense_tiles.DENSE_MAX_KEYS` keys) skips the bias and the blocked attention: the relative terms go straight
  into dense per-tile logits, over cache-sized chunks of tiles (`dense_tiles.py`).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from jaxattn.core import image_tiles
from jaxattn.dot_product import dot_product_attention
from jaxattn.halo.dense_tiles import chunked_tile_attention
from jaxattn.halo.relative import axis_logits


def halo_windows(x, block, halo):
    """`[B, H, W, *rest]` -> `[B, (H/block)*(W/block), win*win, *rest]`, windows of the map zero-padded by `halo`."""
    win = block + 2 * halo
    reps = math.ceil(win / block)

    def windows_along(x, axis):  # splits `axis` (length n*block) into [n, win] at axis, axis + 1
        n = x.shape[axis] // block
        pad = [(0, 0)] * x.ndim
        pad[axis] = (halo, (reps - 1) * block - halo)
        xp = jnp.pad(x, pad)
        xb = xp.reshape(*xp.shape[:axis], n + reps - 1, block, *xp.shape[axis + 1:])
        parts = [xb[(slice(None),) * axis + (slice(t, t + n),)] for t in range(reps)]
        joined = jnp.concatenate(parts, axis=axis + 1)
        return joined[(slice(None),) * (axis + 1) + (slice(0, win),)]

    b, h, w, *rest = x.shape
    x = windows_along(windows_along(x, 1), 3)  # [B, nh, win, nw, win, *rest]
    x = x.transpose(0, 1, 3, 2, 4, *range(5, x.ndim))
    return x.reshape(b, (h // block) * (w // block), win * win, *rest)


def rel_bias(q_tiles, rel_height, rel_width, win):
    """timm's relative logits of `q [Bt, bq, bq, N, D]` as an additive bias `[Bt, N, bq*bq, win*win]` (fp32)."""
    bt, bq, _, n, _ = q_tiles.shape
    height, width = axis_logits(q_tiles, rel_height, rel_width, win)
    bias = jnp.zeros((bt, n, bq, bq, win, win), jnp.float32)
    if height is not None:  # query row qy, key row ky
        bias = bias + height[..., :, None]
    if width is not None:  # query column qx, key column kx
        bias = bias + width[..., None, :]
    return bias.reshape(bt, n, bq * bq, win * win)


def _padding_mask(h, w, block, halo, batch):
    """`[batch * blocks, 1, 1, win*win]`: True where a window position lies inside the unpadded map."""
    inside = halo_windows(jnp.ones((1, h, w), jnp.bool_), block, halo)[0]  # padding is False
    return jnp.tile(inside, (batch, 1))[:, None, None, :]


def halo_attention_xla(query, key, value, rel_height, rel_width, *, block_size, halo_size, query_stride, scale,
                       mask_padding, small_windows=False):
    """Returns `[B, H/s, W/s, N, Dv]` in the query dtype (see `jaxattn.halo_attention`)."""
    b, hq, wq, n, d = query.shape
    h, w = key.shape[1:3]
    bq, win = block_size // query_stride, block_size + 2 * halo_size
    q = image_tiles.to_windows(query, (bq, bq)).reshape(-1, bq, bq, n, d)
    k = halo_windows(key, block_size, halo_size).reshape(-1, win, win, n, d)
    v = halo_windows(value, block_size, halo_size).reshape(-1, win * win, n, value.shape[-1])
    mask = _padding_mask(h, w, block_size, halo_size, b) if mask_padding else None
    if small_windows:
        out = chunked_tile_attention(q, k.reshape(-1, win * win, n, d), v, rel_height, rel_width, mask,
                                     scale=scale)
        return image_tiles.from_windows(out.reshape(b, -1, *out.shape[1:]), (bq, bq), (hq, wq))
    bias = None
    if rel_height is not None or rel_width is not None:
        bias = rel_bias(q, rel_height, rel_width, win).astype(query.dtype)
    q, k = q.reshape(-1, bq * bq, n, d), k.reshape(-1, win * win, n, d)
    out = dot_product_attention(q, k, v, bias, mask, scale=scale)  # [B*blocks, bq*bq, N, Dv]
    return image_tiles.from_windows(out.reshape(b, -1, *out.shape[1:]), (bq, bq), (hq, wq))
