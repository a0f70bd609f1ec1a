"""Halo attention as tiles (reshapes and static slices, no gather of the map) around `dot_product_attention`.

- Query blocks: a window tiling of the (possibly subsampled) query map.
- Key/value windows: the map is zero-padded and cut into rows of `block` pixels; the `win = block + 2*halo` window
  of block `i` is the concatenation of the `ceil(win / block)` consecutive row-blocks starting at `i`, trimmed.
  Done per axis, this is a handful of static slices (one fused copy), like timm's `unfold`.
- Relative logits `q . rel_h[ky - qy + win - 1] + q . rel_w[kx - qx + win - 1]` (timm's rel-to-abs indexing)
  are folded into the dot product: each query gets `2*win` extra channels (its logits against the `win` row and
  `win` column offsets) and each key the matching one-hot row/column indicators. One dense attention then gives
  `q.k*scale + rel_logits` exactly, with no `[tokens, win*win]` bias tensor and no bias support needed from the
  attention backend. The one-hot channels are constants, so their (discarded) gradient costs nothing extra.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from jaxattn.core import image_tiles
from jaxattn.dot_product import dot_product_attention


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


def rel_offsets(query_block, win):
    """Table row used by the query at block coordinate `i` for the key at window coordinate `j`: `[bq, win]`.

    timm's `rel_logits_1d` maps relative logits onto the window with `j - i + win - 1` (stride-2 blocks use the
    subsampled query coordinate `i`).
    """
    return jnp.arange(win)[None, :] - jnp.arange(query_block)[:, None] + win - 1


def _augment(q_tiles, k_tiles, rel_height, rel_width, scale, bq, win):
    """Appends the relative-logit channels: `q [Bt, bq, bq, N, D]`, `k [Bt, win, win, N, D]` -> `[Bt, T, N, D']`."""
    offsets = rel_offsets(bq, win)
    q_parts, k_parts = [q_tiles * jnp.asarray(scale, q_tiles.dtype)], [k_tiles]
    eye = jnp.eye(win, dtype=k_tiles.dtype)
    key_shape = k_tiles.shape[:-1] + (win,)
    if rel_height is not None:  # query row qy, key row ky
        table = rel_height[offsets].astype(q_tiles.dtype)  # [bq, win(ky), D]
        q_parts.append(jnp.einsum("byxnd,ykd->byxnk", q_tiles, table, preferred_element_type=jnp.float32))
        k_parts.append(jnp.broadcast_to(eye[:, None, None, :], key_shape))
    if rel_width is not None:  # query column qx, key column kx
        table = rel_width[offsets].astype(q_tiles.dtype)
        q_parts.append(jnp.einsum("byxnd,xkd->byxnk", q_tiles, table, preferred_element_type=jnp.float32))
        k_parts.append(jnp.broadcast_to(eye[None, :, None, :], key_shape))
    q_aug = jnp.concatenate([p.astype(q_tiles.dtype) for p in q_parts], axis=-1)
    k_aug = jnp.concatenate(k_parts, axis=-1)
    return q_aug.reshape(q_aug.shape[0], -1, *q_aug.shape[3:]), k_aug.reshape(k_aug.shape[0], -1, *k_aug.shape[3:])


def _padding_mask(h, w, block, halo, batch):
    """`[batch * blocks, 1, 1, win*win]`: True where a window position lies inside the unpadded map."""
    inside = halo_windows(jnp.ones((1, h, w), jnp.bool_), block, halo)[0]  # padding is False
    return jnp.tile(inside, (batch, 1))[:, None, None, :]


def halo_attention_xla(query, key, value, rel_height, rel_width, *, block_size, halo_size, query_stride, scale,
                       mask_padding):
    """Returns `[B, H/s, W/s, N, Dv]` in the query dtype (see `jaxattn.halo_attention`)."""
    b, hq, wq, n, d = query.shape
    h, w = key.shape[1:3]
    bq, win = block_size // query_stride, block_size + 2 * halo_size
    q = image_tiles.to_windows(query, (bq, bq))  # [B, blocks, bq*bq, N, D]
    k = halo_windows(key, block_size, halo_size)  # [B, blocks, win*win, N, D]
    v = halo_windows(value, block_size, halo_size)
    q = q.reshape(-1, bq * bq, n, d)
    k = k.reshape(-1, win * win, n, d)
    v = v.reshape(-1, win * win, n, value.shape[-1])
    if rel_height is not None or rel_width is not None:
        q, k = _augment(q.reshape(-1, bq, bq, n, d), k.reshape(-1, win, win, n, d), rel_height, rel_width,
                        scale, bq, win)
        scale = 1.0
    mask = _padding_mask(h, w, block_size, halo_size, b) if mask_padding else None
    out = dot_product_attention(q, k, v, mask=mask, scale=scale)  # [B*blocks, bq*bq, N, Dv]
    return image_tiles.from_windows(out.reshape(b, -1, *out.shape[1:]), (bq, bq), (hq, wq))
