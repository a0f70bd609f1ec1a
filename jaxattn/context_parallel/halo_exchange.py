"""Halo exchange: neighborhood attention and HaloNet halo attention with one spatial axis sharded over a mesh axis.

A device needs only the few border tokens of its two neighbours that its queries' windows reach, so one
`ppermute` each way (of `left` and `right` tokens, fixed by the window, not by the sequence length) replaces the
all-to-all traffic of dense context parallelism. Gradients are autodiff: the transpose of a `ppermute` is the
reverse `ppermute`, again border-sized.

Neighborhood attention (exactness). Let device `p` of `P` hold positions `[s, s + L)` of a global axis of length
`T = P * L`. Each device runs the single-device op on a contiguous *block* `[o, o + E)` of the global axis,
`E = L + left + right`, and keeps the outputs of its own queries. Claim: for a query whose global window lies
inside the block, the op run on the block alone (its own length, its own borders) picks the same keys.
  A shift keeps residues mod `d`, so the block's dilation groups are the global ones, cut: group `g`'s positions
  in the block are a run `c, c+1, ..., c+Lb-1` of its indices (group index `ii` -> block index `ii - c`); the
  op's rules (`jaxattn.core.neighborhood_windows`) read only group indices, so in block coordinates the window
  start is `clamp(x - c, 0, Lb - k)` against the global `clamp(x, 0, Lg - k)`, `x = ii - k // 2`.
  If the global start `w` is unclamped (`w = x`), the window inside the block gives `0 <= x - c <= Lb - k`: same.
  If `w = 0 > x`, member 0 is in the block, so `c = 0` and both clamp to 0. If `w = Lg - k < x`, the group's
  last member is in the block, so `Lb = Lg - c`, and the block clamps to `Lg - k - c`: the same keys. Causal
  windows `max(ii - k + 1, 0) .. ii` and the rpb index `m - ii + k - 1` are translation-invariant the same way.
  Dilation groups need no care (the argument holds per group); the inward shift at the global borders is
  reproduced because the block then *ends (starts) at the global border*, with no fake tokens. Stride (GNA)
  is not translation-invariant (its runs start at multiples of `s`), so it is rejected on the sharded axis.
`left`/`right` are the exact worst case over all queries (`neighborhood_halo`: `(k//2)*d` inside, more near the
borders where windows shift inward; `right = 0` when causal). Interior devices use the block
`[s - left, s + L + right)`. Device 0 uses `[0, E)` and device `P-1` uses `[T - E, T)`: the same exchanged
arrays rolled by `-left` / `+right`, so the tokens with no sender sit where no kept window reads them. Queries of
the halo positions are zeros and their outputs are dropped (the price: `(left + right) / L` extra query rows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxattn.context_parallel import common, window
from jaxattn.context_parallel.shard_call import shard_call
from jaxattn.core import image_tiles
from jaxattn.core import neighborhood_windows as windows
from jaxattn.dot_product import dot_product_attention
from jaxattn.halo import halo_attention
from jaxattn.halo.xla import halo_windows, rel_bias
from jaxattn.neighborhood import neighborhood_attention


def neighborhood_halo(length: int, devices: int, kernel: int, dilation: int = 1, causal: bool = False):
    """Border tokens `(left, right)` that the queries of `length / devices`-long shards of one axis need from the
    previous / next shard (the maximum over all shards). Static numpy."""
    local = length // devices
    nq = -(-length // dilation)
    lo, hi = windows.group_windows(length, kernel, dilation, 1, causal, nq)
    pos = np.arange(length)
    g, ii = pos % dilation, pos // dilation
    first = g + lo[g, ii] * dilation
    last = g + (hi[g, ii] - 1) * dilation
    start = (pos // local) * local
    return int(max(np.max(start - first), 0)), int(max(np.max(last - (start + local - 1)), 0))


def neighborhood_shardable(length: int, devices: int, kernel: int, dilation: int = 1, causal: bool = False) -> bool:
    """Whether `halo_neighborhood_attention` accepts an axis of `length` over `devices` (for callers that fall
    back to the single-device op otherwise): it divides, every shard holds the border tokens its neighbours
    need, and each device's block fits in the axis and holds `kernel * dilation` tokens."""
    return _neighborhood_sharding(length, devices, kernel, dilation, causal)[1] is None


def halo_attention_shardable(length: int, devices: int, block_size: int, halo_size: int) -> bool:
    """Whether `halo_exchange_halo_attention` accepts a key map whose sharded side (rows for `axis=1`, columns
    for `axis=2`) has `length` pixels over `devices` (for callers that fall back to the single-device op
    otherwise): it divides, and every shard holds whole `block_size` blocks and at least the `halo_size` rows
    its neighbours need. (The query side then divides too: the op needs `block_size % query_stride == 0`.)"""
    return _halo_attention_sharding(length, devices, block_size, halo_size) is None


def _neighborhood_sharding(length, devices, kernel, dilation, causal):
    """`(halo, problem)`: the `(left, right)` border tokens (None if the axis does not divide) and why the axis
    cannot be sharded (None if it can). The one statement of the rules: the predicate and the checks use it."""
    if length % devices:
        return None, f"the length is not divisible by the {devices} devices"
    if kernel * dilation > length:
        return None, f"kernel * dilation = {kernel * dilation} exceeds the length"
    local, halo = length // devices, neighborhood_halo(length, devices, kernel, dilation, causal)
    if max(halo) > local:
        return halo, (f"kernel {kernel} with dilation {dilation} reaches {halo[0]} tokens into the previous shard "
                      f"and {halo[1]} into the next (neighbours only exchange their own tokens)")
    if not kernel * dilation <= local + sum(halo) <= length:
        return halo, (f"each device's block of {local} + {sum(halo)} halo tokens must fit in the axis and hold "
                      f"kernel * dilation = {kernel * dilation} tokens")
    return halo, None


def _halo_attention_sharding(length, devices, block_size, halo_size):
    """Why a sharded side of `length` cannot be split for `halo_exchange_halo_attention` (None if it can)."""
    if length % devices:
        return f"is not divisible by the {devices} devices"
    local = length // devices
    if local % block_size or halo_size > local:
        return (f"gives shards of {local}, which must be a multiple of `block_size` ({block_size}) and at least "
                f"`halo_size` ({halo_size})")
    return None


def halo_neighborhood_attention(query, key, value, kernel_size, *, dilation=1, stride=1, is_causal=False, rpb=None,
                                scale=None, return_lse=False, axis=1, mesh=None, axis_name="context",
                                batch_axes=None, implementation=None):
    """`jaxattn.neighborhood_attention` with spatial axis `axis` sharded over the mesh axis `axis_name`.

    Same arguments and results as the op (any of its 1-3 spatial axes may be the sharded one, GQA and `rpb`
    included); per device, one `ppermute` each way of the `(left, right)` border tokens of keys and values
    (`neighborhood_halo`; `(k//2)*d` away from the borders, none to the right when causal on that axis).

    Args (besides the op's):
      axis: the sharded array axis, `1 .. num_spatial` (1: the sequence of `[B, L, N, H]`, or image rows of
        `[B, H, W, N, C]`). Its length must be a multiple of the axis size `P` (no padding: padding would move
        the global border the windows shift against), every shard at least as long as the halo it sends, and
        `stride` 1 on it (`neighborhood_shardable` says beforehand whether an axis is accepted).
      mesh, axis_name, batch_axes: as every context-parallel strategy (`jaxattn.context_parallel`).
    """
    common.check_outside_shard_map(axis_name, "halo_neighborhood_local")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    rpb = None if rpb is None else jnp.asarray(rpb)
    # Full validation with the global shapes (errors name the real arguments); traces nothing heavy.
    jax.eval_shape(lambda q, k, v, r: neighborhood_attention(q, k, v, kernel_size, dilation=dilation, stride=stride,
                                                             is_causal=is_causal, rpb=r, scale=scale),
                   query, key, value, rpb)
    nd = query.ndim - 3
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not 1 <= axis <= nd:
        raise ValueError(f"`axis` must be a spatial axis in 1..{nd} of query {tuple(query.shape)}, got {axis!r}")
    a = axis - 1
    kernel, dil, strd = (_per_axis(v, nd)[a] for v in (kernel_size, dilation, stride))
    causal = bool(_per_axis(is_causal, nd)[a])
    if strd != 1:
        raise ValueError(f"`stride` must be 1 on the sharded axis {axis} (its query runs are not translation "
                         f"invariant), got stride {stride!r}")
    mesh = common.resolve_mesh(mesh)
    devices = common.axis_size(mesh, axis_name)
    spec = _check_sharding(mesh, axis_name, batch_axes, axis, query=query, key=key, value=value)
    length = query.shape[axis]
    halo, problem = _neighborhood_sharding(length, devices, kernel, dil, causal)
    if problem is not None:
        raise ValueError(f"query axis {axis} of length {length} (shape {tuple(query.shape)}) over {devices} devices "
                         f"(shards of {length // devices}): {problem}: use fewer devices or a longer axis")

    def body(q, k, v, r):
        return halo_neighborhood_local(q, k, v, kernel_size, halo=halo, dilation=dilation, stride=stride,
                                       is_causal=is_causal, rpb=r, scale=scale, return_lse=return_lse, axis=axis,
                                       axis_name=axis_name, implementation=implementation)

    lse_spec = PartitionSpec(*spec[:-1])
    out_specs = (spec, lse_spec) if return_lse else spec
    rpb_spec = None if rpb is None else PartitionSpec()
    return shard_call(body, mesh, (spec, spec, spec, rpb_spec), out_specs, query, key, value, rpb)


def halo_neighborhood_local(query, key, value, kernel_size, *, halo, axis=1, axis_name="context",
                            implementation=None, **op_kwargs):
    """The per-device body of `halo_neighborhood_attention` (inside a `shard_map` over `axis_name`).

    Local shards `[b, ..., L, ..., N, H]` of equal length along `axis`, in order along `axis_name`;
    `halo = (left, right)` from `neighborhood_halo` for the global length; `op_kwargs` go to the op.
    """
    left, right = halo
    n, idx = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    key, value = window.exchange_borders([key, value], axis, left, right, axis_name)
    pad = [(0, 0)] * query.ndim
    pad[axis] = (left, right)
    # Border devices see the global border instead of missing neighbours (module docstring).
    shift = jnp.where(idx == 0, -left, jnp.where(idx == n - 1, right, 0))
    q_block, k_block, v_block = (jnp.roll(x, shift, axis) for x in (jnp.pad(query, pad), key, value))
    res = neighborhood_attention(q_block, k_block, v_block, kernel_size, implementation=implementation,
                                 **op_kwargs)
    length = query.shape[axis]
    crop = lambda x: jax.lax.dynamic_slice_in_dim(x, left + shift, length, axis)
    return tuple(map(crop, res)) if isinstance(res, tuple) else crop(res)


def halo_exchange_halo_attention(query, key, value, block_size, halo_size, *, rel_height=None, rel_width=None,
                                 scale=None, query_stride=1, mask_padding=False, axis=1, mesh=None,
                                 axis_name="context", batch_axes=None):
    """`jaxattn.halo_attention` (HaloNet) with image rows (`axis=1`) or columns (`axis=2`) sharded over `axis_name`.

    Same arguments and results as the op. Shards hold whole query blocks: the sharded side of the key map must be
    a multiple of `P * block_size`, and `halo_size <= ` a shard. Each device receives `halo_size` rows (columns)
    of keys and values from each neighbour; at the image border the missing neighbour's rows are the op's own
    zero padding (masked with `mask_padding`, timm's plain zeros otherwise). `halo_attention_shardable` says
    beforehand whether a map is accepted.
    """
    common.check_outside_shard_map(axis_name, "halo_attention_local")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    tables = [None if t is None else jnp.asarray(t) for t in (rel_height, rel_width)]
    op = dict(scale=scale, query_stride=query_stride, mask_padding=mask_padding)
    jax.eval_shape(lambda q, k, v, rh, rw: halo_attention(q, k, v, block_size, halo_size, rel_height=rh,
                                                          rel_width=rw, **op), query, key, value, *tables)
    if axis not in (1, 2) or isinstance(axis, bool):
        raise ValueError(f"`axis` must be 1 (image rows) or 2 (columns), got {axis!r}")
    mesh = common.resolve_mesh(mesh)
    devices = common.axis_size(mesh, axis_name)
    spec = _check_sharding(mesh, axis_name, batch_axes, axis, query=query)
    _check_sharding(mesh, axis_name, batch_axes, axis, key=key, value=value)
    problem = _halo_attention_sharding(key.shape[axis], devices, block_size, halo_size)
    if problem is not None:
        raise ValueError(f"`key` axis {axis} ({key.shape[axis]}, shape {tuple(key.shape)}) over {devices} devices "
                         f"{problem}")
    if axis == 2:  # the op is symmetric under a transpose that swaps the relative tables
        tables = tables[::-1]

    def body(q, k, v, rh, rw):
        if axis == 2:
            q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        out = halo_attention_local(q, k, v, block_size, halo_size, rel_height=rh, rel_width=rw,
                                   axis_name=axis_name, **op)
        return jnp.swapaxes(out, 1, 2) if axis == 2 else out

    table_specs = [None if t is None else PartitionSpec() for t in tables]
    return shard_call(body, mesh, (spec, spec, spec, *table_specs), spec, query, key, value, *tables)


def halo_attention_local(query, key, value, block_size, halo_size, *, rel_height=None, rel_width=None, scale=None,
                         query_stride=1, mask_padding=False, axis_name="context"):
    """The per-device body of `halo_exchange_halo_attention`: local rows `[b, Hl/s, W/s, N, D]` (queries) and
    `[b, Hl, W, N, D]` (keys, values), `Hl` a multiple of `block_size`, shards in row order along `axis_name`."""
    b, hq, wq, n, d = query.shape
    bs, h = block_size, halo_size
    bq, win = bs // query_stride, bs + 2 * h
    n_idx, idx = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    # Rows [start - h, end + h) of the zero-padded map; zeros arrive where there is no neighbour. `halo_windows`
    # pads by h again, so put (c*bs - h) more rows on each side: the windows of its block rows c .. c + n - 1
    # then start at our row 0, i.e. the global row start - h (c = ceil(h / bs) keeps the height a multiple of bs).
    c = -(-h // bs)
    extra = [(0, 0)] * key.ndim
    extra[1] = (c * bs - h,) * 2
    rows = key.shape[1] // bs

    def windows_of(ext):
        wins = halo_windows(ext, bs, h)  # [b, (rows + 2c) * nw, win*win, ...]
        wins = wins.reshape(b, rows + 2 * c, -1, *wins.shape[2:])[:, c:c + rows]
        return wins.reshape(-1, win * win, *wins.shape[4:])

    q = image_tiles.to_windows(query, (bq, bq)).reshape(-1, bq, bq, n, d)
    k, v = (windows_of(jnp.pad(x, extra)) for x in window.exchange_borders([key, value], 1, h, h, axis_name))
    bias = None
    if rel_height is not None or rel_width is not None:
        bias = rel_bias(q, rel_height, rel_width, win).astype(query.dtype)
    mask = None
    if mask_padding:  # rows from a missing neighbour are the image's zero padding
        inside = jnp.ones((1, key.shape[1] + 2 * h, key.shape[2], 1), jnp.float32)
        row = jnp.arange(key.shape[1] + 2 * h)[None, :, None, None]
        inside = inside * ((row >= h) | (idx > 0)) * ((row < key.shape[1] + h) | (idx < n_idx - 1))
        wins = halo_windows(jnp.pad(inside, extra[:4]), bs, h).reshape(1, rows + 2 * c, -1, win * win)[:, c:c + rows]
        mask = jnp.tile(wins.reshape(-1, win * win) > 0.5, (b, 1))[:, None, None, :]
    out = dot_product_attention(q.reshape(-1, bq * bq, n, d), k, v, bias, mask, scale=scale)
    return image_tiles.from_windows(out.reshape(b, -1, *out.shape[1:]), (bq, bq), (hq, wq))


def _per_axis(value, nd):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd


def _check_sharding(mesh, axis_name, batch_axes, axis, **arrays):
    """`ValueError` unless every array's `axis` divides over `axis_name` and its batch over the batch axes; returns
    the `PartitionSpec` (batch over `batch_axes`, `axis` over `axis_name`)."""
    devices = common.axis_size(mesh, axis_name)
    axes = common.batch_axes_of(mesh, axis_name, batch_axes)
    batch_devices = int(np.prod([mesh.shape[x] for x in axes])) if axes else 1
    rank = 0
    for name, x in arrays.items():
        common.check_divisible(name, x, axis, devices, f"the size of mesh axis {axis_name!r}")
        common.check_divisible(name, x, 0, batch_devices, "the product of the batch mesh axes")
        rank = x.ndim
    parts = [None] * rank
    parts[0] = None if not axes else (axes[0] if len(axes) == 1 else axes)
    parts[axis] = axis_name
    return PartitionSpec(*parts)
