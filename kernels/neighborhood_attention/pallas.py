"""Fused neighborhood attention as Pallas kernels for TPU (Mosaic) and GPU (Pallas-Triton), forward and backward.

`neighborhood_attention` moves the op's heads-last arrays into the kernels' layout (`geometry.py`: dilation groups
into the batch, queries cut into tiles and keys into boxes of their own sizes, each flattened tile-major, features
padded for Triton; plain XLA that differentiates itself) and runs the kernels through a custom VJP:

- forward (`pallas_fwd`): one query tile per program against the key boxes its windows touch; out + fp32 lse;
- backward (`pallas_bwd`): dq (+ d rpb partials) per query tile, dk/dv per key box over the query tiles that
  visit it (GQA heads accumulated in place), both recomputing probabilities from the lse.

Supported: 1-D, 2-D and 3-D, any kernel size (odd or even), dilation, stride (GNA), causal per axis, relative
position bias, GQA, any head dims. The bias enters as a few precomputed tiles (one per tile offset); its gradient
is summed in the dq kernel with one compare/select per table entry, so bias tables of more than
`MAX_RPB_ENTRIES` entries (e.g. 3-D k = 7) are left to the XLA path (`supports`).
Mosaic GPU is not targeted (the body uses `jnp.dot` on register values, as the flash-attention kernels do).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxattn.core import blocking, softmax
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import partition, platform
from jaxattn.kernels.neighborhood_attention import blocks, pallas_bwd, pallas_fwd
from jaxattn.kernels.neighborhood_attention.geometry import Geometry

MAX_RPB_ENTRIES = 256  # 2-D k <= 7 (169), 1-D any realistic k, 3-D k <= 5 (125)
TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class _Static:
    geo: Geometry
    scale: float
    target: str
    mode: str


def supports(rpb=None, spec=None, **_) -> bool:
    """The dispatch predicate: everything except bias tables too large to expand in the kernel."""
    if rpb is None or spec is None:
        return True
    size = 1
    for k in spec.kernel_size:
        size *= 2 * k - 1
    return size <= MAX_RPB_ENTRIES


@platform.lowering_target
def neighborhood_attention(query, key, value, rpb=None, *, spec, scale=None, target=None, tiles=None,
                           key_tiles=None, reduction=None, generation=None):
    """Neighborhood attention with the Pallas kernels. Returns `(out [B, *spatial, N, Hv], lse [B, *spatial, N])`.

    Semantics and argument checks are those of `jaxattn.neighborhood_attention` (call it with
    `implementation='pallas'` for validated arguments); `spec` is its `neighborhood_windows.NASpec`.
      query `[B, *spatial, N, H]`, key `[B, *spatial, K, H]`, value `[B, *spatial, K, Hv]` (N % K == 0);
      rpb: `[N, 2k1-1, ...]` or None; scale: default `H ** -0.5`.
      target: 'tpu', 'triton', 'interpret' or 'tpu_interpret' (default: the platform the program is lowered for).
      tiles, key_tiles: query tile and key box extents per axis in dilation-group indices (an int or a tuple;
        default per target and problem, `blocks.fit`).
      reduction: 'grid' or 'fori' (default 'grid' on TPU, 'fori' elsewhere; Triton needs 'fori').
      generation: the TPU generation for the default tiles ('v4', 'v5e', 'v5p', 'v6e'; default: the device the
        program is lowered for when known, `blocks.tpu_generation`).
    """
    target = platform.resolve_target(target)
    mode = reduction or ("grid" if platform.tpu_like(target) else "fori")
    if mode not in ("grid", "fori"):
        raise ValueError(f"`reduction` must be 'grid' or 'fori', got {reduction!r}")
    if target == "tpu" and mode != "grid":
        raise ValueError("target='tpu' walks key boxes on the grid (reduction='grid')")
    b, *spatial, n, h = query.shape
    query_tiles, key_boxes = blocks.fit(target, tuple(spatial), spec, tiles, key_tiles, generation)
    geo = Geometry(b, tuple(spatial), n, key.shape[-2], spec.kernel_size, spec.dilation, spec.stride,
                   spec.is_causal, query_tiles, key_boxes)
    scale = float(h ** -0.5 if scale is None else scale)
    return _neighborhood(query, key, value, rpb, _Static(geo, scale, target, mode))


def attention(query, key, value, rpb, *, scale, spec, target=None):
    """The `neighborhood_attention` backend signature."""
    return neighborhood_attention(query, key, value, rpb, spec=spec, scale=scale, target=target)


@functools.partial(jax.jit, static_argnums=(4,))
def _neighborhood(query, key, value, rpb, static: _Static):
    geo = static.geo
    h, hv = query.shape[-1], value.shape[-1]
    hp, hvp = (common_blocks.feature_dim(x, static.target) for x in (h, hv))
    q = geo.to_kernel(query, hp, "query")
    k, v = geo.to_kernel(key, hp, "key"), geo.to_kernel(value, hvp, "key")
    rows = None
    if rpb is not None:
        width = max(TPU_LANES, common_blocks.next_power_of_2(geo.rpb_size))
        rows = blocking.pad_axis(rpb.astype(jnp.float32).reshape(geo.heads, 1, geo.rpb_size), 2, width)
    out, lse = _attend(q, k, v, rows, static)
    out = geo.from_kernel(out, hv, "query")
    lse = geo.from_kernel(lse, 1, "query")[..., 0]
    return out, lse


def _bias_tiles(rows, geo: Geometry):
    """The table rows `[N, 1, Pp]` -> the bias tile of every box offset, `[N, offsets, bq, bk]` fp32 (XLA gather,
    a few tiles per head; treated as a function of `rows` inside the custom VJP, whose backward sums the table's
    gradient directly)."""
    if rows is None:
        return None
    return jnp.take(rows[:, 0, :], jnp.asarray(geo.bias_index), axis=1)


def _forward(q, k, v, rows, static: _Static):
    def forward(q, k, v, bias, *, geo):
        return pallas_fwd.forward(q, k, v, bias, geo=geo, scale=static.scale, target=static.target,
                                  mode=static.mode)

    return _per_shard(forward, static.geo, (q, k, v), (_bias_tiles(rows, static.geo),), (ROWS, KV, KV),
                      (BIAS_TILES,), (ROWS, ROWS))


# `partition.per_shard` roles of the kernels' arrays (their batch `Bd = groups x B`, see `_per_shard`).
ROWS, KV = "b n . .", "b k . ."  # [Bd, N, Sq, .] (q, out, lse, d_out, delta, dq), [Bd, K, Sk, .] (k, v, dk, dv)
BIAS_TILES, RPB_ROWS = "n . . .", "n . ."  # [N, offsets, bq, bk], [N, 1, Pp]


def _per_shard(kernel, geo: Geometry, batched, others, batched_dims, other_dims, out_dims):
    """`kernel(*batched, *others, geo=)` run per shard of batch rows and heads. `batched` (q, k first) and the
    results have the kernels' batch `Bd`, dilation groups leading: it is split as `[groups, B]`, so that B
    splits like the op's batch; each shard gets the geometry of its rows and heads."""
    g = geo.groups

    def local(*args):
        xs = [x.reshape(-1, *x.shape[2:]) for x in args[:len(batched)]]
        shard = dataclasses.replace(geo, batch=xs[0].shape[0] // g, heads=xs[0].shape[1], kv_heads=xs[1].shape[1])
        outs = kernel(*xs, *args[len(batched):], geo=shard)
        return tuple(o.reshape(g, -1, *o.shape[1:]) for o in outs)

    grouped = tuple(x.reshape(g, -1, *x.shape[1:]) for x in batched)
    outs = partition.per_shard(local, (*grouped, *others), (*(". " + d for d in batched_dims), *other_dims),
                               [". " + d for d in out_dims])
    return tuple(o.reshape(-1, *o.shape[2:]) for o in outs)


def _backward_kernels(q, k, v, bias, rows, d_out, lse, delta, static: _Static):
    """`(dq, d rpb partials or None, dk, dv)`, each kernel run per shard."""
    common = dict(scale=static.scale, target=static.target, mode=static.mode)
    batched, dims = (q, k, v, d_out, lse, delta), (ROWS, KV, KV, ROWS, ROWS, ROWS)

    def dq(q, k, v, d_out, lse, delta, bias, rows, *, geo):
        dq, drows = pallas_bwd.dq(q, k, v, bias, rows, d_out, lse, delta, geo=geo, **common)
        return (dq,) if rows is None else (dq, drows)

    def dkv(q, k, v, d_out, lse, delta, bias, *, geo):
        return pallas_bwd.dkv(q, k, v, bias, d_out, lse, delta, geo=geo, **common)

    dq_out = _per_shard(dq, static.geo, batched, (bias, rows), dims, (BIAS_TILES, RPB_ROWS),
                        (ROWS,) if rows is None else (ROWS, ROWS + " ."))
    dk, dv = _per_shard(dkv, static.geo, batched, (bias,), dims, (BIAS_TILES,), (KV, KV))
    return dq_out[0], (dq_out[1] if rows is not None else None), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, rows, static):
    return _forward(q, k, v, rows, static)


def _attend_fwd(q, k, v, rows, static):
    # symbolic_zeros: a bias table that is not differentiated (frozen, or a constant) skips the dq kernel's
    # per-entry gradient sums; `()` vs None is pytree structure, hence static in the backward.
    wants_drows = rows is not None and rows.perturbed
    q, k, v, rows = (None if x is None else x.value for x in (q, k, v, rows))
    out, lse = _forward(q, k, v, rows, static)
    return (out, lse), (q, k, v, rows, out, lse, () if wants_drows else None)


def _attend_bwd(static: _Static, residuals, cotangents):
    q, k, v, rows, out, lse, wants_drows = residuals
    d_out, d_lse = cotangents
    if isinstance(d_out, SymbolicZero):
        d_out = jnp.zeros(out.shape, out.dtype)
    delta = softmax.backward_delta(out, d_out, None if isinstance(d_lse, SymbolicZero) else d_lse, keepdims=True)
    d_out = d_out.astype(q.dtype)
    dq, drows, dk, dv = _backward_kernels(q, k, v, _bias_tiles(rows, static.geo),
                                          rows if wants_drows is not None else None, d_out, lse, delta, static)
    if drows is not None:
        drows = jnp.sum(drows, axis=(0, 2)).astype(rows.dtype)  # [N, 1, Pp]
    elif rows is not None:
        drows = jnp.zeros_like(rows)
    return dq, dk, dv, drows


_attend.defvjp(_attend_fwd, _attend_bwd, symbolic_zeros=True)
