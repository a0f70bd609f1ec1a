"""Public entry points of MaxViT's multi-axis attention: validation and backend dispatch."""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import dispatch, image_tiles, validation

OPS = {"block": "block_attention", "grid": "grid_attention"}


def _load_reference():
    from jaxattn.multi_axis.reference import partition_attention_reference
    return partition_attention_reference


def _load_dense():
    from jaxattn.multi_axis.dense import partition_attention_dense
    return partition_attention_dense


def _load_xla():
    from jaxattn.multi_axis.xla import partition_attention_xla
    return partition_attention_xla


# Tiles of at most this many tokens take 'small_tiles' on CPU under None (measured: WORKSPACE, "MaxViT on CPU").
SMALL_TILE_TOKENS = 64


def _small_tiles_supports(size=None, **_):
    """Needs tiles of at most SMALL_TILE_TOKENS tokens (larger ones go to xla)."""
    return size is not None and size[0] * size[1] <= SMALL_TILE_TOKENS


for _op in OPS.values():
    dispatch.register(_op, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
    dispatch.register(_op, dispatch.Backend("small_tiles", _load_dense, platforms=("cpu",), priority=1,
                                            supports=_small_tiles_supports))
    dispatch.register(_op, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))


def block_attention(query, key, value, window_size, *, bias=None, scale=None, implementation=None):
    """MaxViT block (window) attention: softmax attention inside each non-overlapping `p x p` window.

    The map is cut as timm's `window_partition`: window `(i, j)` holds the tokens at `(i*ph + a, j*pw + c)`,
    token index `a * pw + c` inside the window (the row/column of `bias`).

    Args:
      query, key, value: `[B, H, W, N, D]` (value may have its own head_dim `Dv`), one dtype.
      window_size: `p` or `(ph, pw)`; `H` and `W` must be multiples of it (no implicit padding: pad first).
      bias: optional additive logits `[N, ph*pw, ph*pw]` (or broadcastable to it), shared by every window;
        the model turns its `(2p-1) x (2p-1)` relative-position table into this. Differentiable.
      scale: logit scale, default `D ** -0.5` (MaxViT's).
      implementation: 'reference', 'small_tiles' (the reference's fp32 softmax with a backward whose dots XLA:CPU
        runs fast; None takes it for CPU at tiles of <= 64 tokens), 'xla' (tiles + `dot_product_attention`), or
        None for the best on the lowering platform.

    Returns:
      `[B, H, W, N, Dv]` in the query dtype.
    """
    return _partition_attention("block", "window_size", query, key, value, window_size, bias, scale,
                                implementation)


def grid_attention(query, key, value, grid_size, *, bias=None, scale=None, implementation=None):
    """MaxViT grid attention: sparse global attention among the `g x g` tokens spaced `H/g`, `W/g` apart.

    The map is cut as timm's `grid_partition`: viewing `[B, H, W]` as `[B, gh, H/gh, gw, W/gw]`, tile `(i, j)` holds
    the tokens at `(a * H/gh + i, c * W/gw + j)` for `a < gh`, `c < gw`, token index `a * gw + c` (the row/column of
    `bias`).

    Args:
      query, key, value: `[B, H, W, N, D]` (value may have its own head_dim `Dv`), one dtype.
      grid_size: `g` or `(gh, gw)`; `H` and `W` must be multiples of it (no implicit padding: pad first).
      bias: optional additive logits `[N, gh*gw, gh*gw]` (or broadcastable to it), shared by every tile.
      scale: logit scale, default `D ** -0.5`.
      implementation: 'reference', 'small_tiles' (the reference's fp32 softmax with a backward whose dots XLA:CPU
        runs fast; None takes it for CPU at tiles of <= 64 tokens), 'xla' (tiles + `dot_product_attention`), or
        None for the best on the lowering platform.

    Returns:
      `[B, H, W, N, Dv]` in the query dtype.
    """
    return _partition_attention("grid", "grid_size", query, key, value, grid_size, bias, scale, implementation)


def _partition_attention(partition, size_name, query, key, value, size, bias, scale, implementation):
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    image_tiles.check_image_qkv(query, key, value)
    image_tiles.check_same_spatial("key", key, "query", query)
    size = image_tiles.tile_size(size_name, size)
    image_tiles.check_divides(size_name, size, "query", query)
    tokens = size[0] * size[1]
    if bias is not None:
        bias = jnp.asarray(bias)
        validation.check_floating("bias", bias)
        validation.check_broadcastable("bias", bias, (query.shape[3], tokens, tokens), "[N, T, T] (T = tile tokens)")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return dispatch.call(OPS[partition], implementation,
                         lambda impl: impl(query, key, value, bias, partition=partition, size=size, scale=scale),
                         query=query, key=key, value=value, bias=bias, size=size)
