"""Heads-last image tensors `[B, H, W, *rest]`: argument checks and tilings shared by the 2-D vision ops.

Tilings are reshapes plus one transpose, never gathers, so XLA emits at most one copy (often fused):
- windows (Swin/MaxViT block attention, BiFormer regions): `(H/ph) x (W/pw)` non-overlapping `ph x pw` tiles;
- grid (MaxViT grid attention): a `gh x gw` grid of tokens spaced `H/gh`, `W/gw` apart, one tile per offset.
Tiles are returned as `[B, num_tiles, tile_tokens, *rest]` with tiles and tokens in row-major order.
"""
from __future__ import annotations

from jaxattn.core import validation

IMAGE_LAYOUT = "[batch, height, width, heads, head_dim]"


def check_image_qkv(query, key, value) -> None:
    """Checks rank-5 floating `[B, H, W, N, D]` q/k/v of one dtype with matching batch, heads and head_dim.

    Only key and value must share their spatial size; ops that tie the query's size to it check that themselves.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        validation.check_rank(name, x, 5, IMAGE_LAYOUT)
        validation.check_floating(name, x)
    validation.check_same_dtype(query=query, key=key, value=value)
    for name, x in (("key", key), ("value", value)):
        validation.check_dim(name, x, 0, query.shape[0], "batch size", "`query`")
        validation.check_dim(name, x, 3, query.shape[3], "num_heads", "`query`")
    validation.check_dim("key", key, 4, query.shape[4], "head_dim", "`query`")
    if key.shape[1:3] != value.shape[1:3]:
        raise ValueError(f"`value` spatial size {tuple(value.shape[1:3])} must equal that of `key` "
                         f"{tuple(key.shape[1:3])}; shapes {tuple(key.shape)} and {tuple(value.shape)}")


def check_same_spatial(name, x, other_name, other) -> None:
    if x.shape[1:3] != other.shape[1:3]:
        raise ValueError(f"`{name}` spatial size {tuple(x.shape[1:3])} must equal that of `{other_name}` "
                         f"{tuple(other.shape[1:3])}; shapes {tuple(x.shape)} and {tuple(other.shape)}")


def tile_size(name: str, value) -> tuple[int, int]:
    """An int or an `(h, w)` pair of positive ints -> `(h, w)`."""
    try:
        size = validation.per_axis(name, value, 2)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive int or a pair of positive ints, got {value!r}") from None
    if min(size) < 1:
        raise ValueError(f"`{name}` must be a positive int or a pair of positive ints, got {value!r}")
    return size


def check_divides(name: str, tile: tuple[int, int], array_name: str, x) -> None:
    """`x`'s height and width must be multiples of `tile` (no implicit padding)."""
    h, w = x.shape[1:3]
    if h % tile[0] or w % tile[1]:
        raise ValueError(f"`{array_name}` height and width {(h, w)} (shape {tuple(x.shape)}) must be multiples of "
                         f"`{name}` {tile}; pad the input first")


def to_windows(x, window: tuple[int, int]):
    """`[B, H, W, *rest]` -> `[B, (H/ph)*(W/pw), ph*pw, *rest]` (timm `window_partition` order)."""
    b, h, w, *rest = x.shape
    ph, pw = window
    x = x.reshape(b, h // ph, ph, w // pw, pw, *rest)
    x = x.transpose(0, 1, 3, 2, 4, *range(5, x.ndim))
    return x.reshape(b, (h // ph) * (w // pw), ph * pw, *rest)


def from_windows(x, window: tuple[int, int], image_hw: tuple[int, int]):
    """Inverse of `to_windows`."""
    b, _, _, *rest = x.shape
    (ph, pw), (h, w) = window, image_hw
    x = x.reshape(b, h // ph, w // pw, ph, pw, *rest)
    x = x.transpose(0, 1, 3, 2, 4, *range(5, x.ndim))
    return x.reshape(b, h, w, *rest)


def to_grid(x, grid: tuple[int, int]):
    """`[B, H, W, *rest]` -> `[B, (H/gh)*(W/gw), gh*gw, *rest]` (timm `grid_partition` order).

    Tile `(i, j)` holds the tokens at `(a * H/gh + i, c * W/gw + j)` for `a < gh`, `c < gw`, in row-major `(a, c)`.
    """
    b, h, w, *rest = x.shape
    gh, gw = grid
    x = x.reshape(b, gh, h // gh, gw, w // gw, *rest)
    x = x.transpose(0, 2, 4, 1, 3, *range(5, x.ndim))
    return x.reshape(b, (h // gh) * (w // gw), gh * gw, *rest)


def from_grid(x, grid: tuple[int, int], image_hw: tuple[int, int]):
    """Inverse of `to_grid`."""
    b, _, _, *rest = x.shape
    (gh, gw), (h, w) = grid, image_hw
    x = x.reshape(b, h // gh, w // gw, gh, gw, *rest)
    x = x.transpose(0, 3, 1, 4, 2, *range(5, x.ndim))
    return x.reshape(b, h, w, *rest)
