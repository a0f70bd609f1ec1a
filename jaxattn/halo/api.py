"""Public entry point of halo attention (HaloNet, timm `HaloAttn` semantics): validation and backend dispatch."""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import dispatch, image_tiles, validation

OP = "halo_attention"


def _load_reference():
    from jaxattn.halo.reference import halo_attention_reference
    return halo_attention_reference


def _load_xla():
    from jaxattn.halo.xla import halo_attention_xla
    return halo_attention_xla


dispatch.register(OP, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
def _load_small_windows():
    import functools

    from jaxattn.halo.xla import halo_attention_xla
    return functools.partial(halo_attention_xla, small_windows=True)


def _small_windows_supports(num_keys=None, **_):
    """Needs windows of at most `dense_tiles.DENSE_MAX_KEYS` keys (larger ones go to xla)."""
    from jaxattn.halo.dense_tiles import DENSE_MAX_KEYS
    return num_keys is not None and num_keys <= DENSE_MAX_KEYS


dispatch.register(OP, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))
dispatch.register(OP, dispatch.Backend("small_windows", _load_small_windows, platforms=("cpu",), priority=1,
                                       supports=_small_windows_supports))


def halo_attention(query, key, value, block_size, halo_size, *, rel_height=None, rel_width=None, scale=None,
                   query_stride=1, mask_padding=False, implementation=None):
    """HaloNet blocked local attention with halos, exactly as timm's `HaloAttn` (after its q/kv projections).

    The key/value map is zero-padded by `halo` on every side. Each non-overlapping `b x b` block of queries attends
    to the `win x win` window (`win = b + 2*halo`) centred on its block. With `mask_padding=False` (default, timm)
    the padded positions are plain zero keys/values that still take softmax weight (logit = the relative term
    only); with `mask_padding=True` (the paper) they are masked out.

    Relative logits (timm `PosEmbedRel`), content-dependent, added after scaling:
      `logits[q, k] = scale * (q . k) + q . rel_height[ky - qy + win - 1] + q . rel_width[kx - qx + win - 1]`
    where `(qy, qx)` is the query's position inside its block (in query pixels) and `(ky, kx)` the key's position
    inside the window (timm's rel-to-abs indexing; only rows `win - bq .. 2*win - 2` of each table are read).
    timm's `scale_pos_embed=True` (relative term scaled too) is the same as passing `scale * rel_*` tables.

    Strided blocks (timm `HaloAttn(stride=2)` when `block % 2 == 0`): timm computes q with a stride-2 1x1 conv,
    i.e. at pixels `(s*i, s*j)`. Pass those queries at the reduced resolution with `query_stride=s`; each block of
    `b x b` key pixels then has `b/s x b/s` queries and the output has the queries' resolution.

    Args:
      query: `[B, H/s, W/s, N, D]`, `s = query_stride`.
      key: `[B, H, W, N, D]`; `H` and `W` must be multiples of `block_size` (timm asserts the same).
      value: `[B, H, W, N, Dv]`, same dtype.
      block_size: `b`, the block side in key pixels; a multiple of `query_stride`.
      halo_size: `h >= 0`.
      rel_height, rel_width: optional tables `[2*(b + 2h) - 1, D]` (timm `pos_embed.height_rel` / `width_rel`).
      scale: logit scale of `q . k`, default `D ** -0.5` (timm's `dim_head_qk ** -0.5`).
      query_stride: `s >= 1`, see above.
      mask_padding: mask the zero padding out of the softmax (paper) instead of attending to it (timm).
      implementation: 'reference' (literal timm re-derivation), 'xla' (tiles + `dot_product_attention`), or None.

    Returns:
      `[B, H/s, W/s, N, Dv]` in the query dtype.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    image_tiles.check_image_qkv(query, key, value)
    block_size, halo_size, query_stride = _check_sizes(block_size, halo_size, query_stride)
    image_tiles.check_divides("block_size", (block_size, block_size), "key", key)
    want = (key.shape[1] // query_stride, key.shape[2] // query_stride)
    if tuple(query.shape[1:3]) != want:
        raise ValueError(f"`query` spatial size {tuple(query.shape[1:3])} must be the key's {tuple(key.shape[1:3])} "
                         f"divided by `query_stride` ({query_stride}), i.e. {want}; shapes {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    win = block_size + 2 * halo_size
    tables = {}
    for name, table in (("rel_height", rel_height), ("rel_width", rel_width)):
        if table is not None:
            table = jnp.asarray(table)
            validation.check_floating(name, table)
            if tuple(table.shape) != (2 * win - 1, query.shape[-1]):
                raise ValueError(f"`{name}` must have shape (2*(block_size + 2*halo_size) - 1, head_dim) = "
                                 f"{(2 * win - 1, query.shape[-1])}, got {tuple(table.shape)}")
        tables[name] = table
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    def run(impl):
        return impl(query, key, value, tables["rel_height"], tables["rel_width"], block_size=block_size,
                    halo_size=halo_size, query_stride=query_stride, scale=scale, mask_padding=bool(mask_padding))

    return dispatch.call(OP, implementation, run, query=query, key=key, value=value,
                         num_keys=win * win, **tables)


def _check_sizes(block_size, halo_size, query_stride):
    def as_int(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        return value

    block_size = as_int("block_size", block_size, 1)
    halo_size = as_int("halo_size", halo_size, 0)
    query_stride = as_int("query_stride", query_stride, 1)
    if block_size % query_stride:
        raise ValueError(f"`block_size` ({block_size}) must be a multiple of `query_stride` ({query_stride})")
    return block_size, halo_size, query_stride
