"""Pallas neighborhood-attention backward (FlashAttention-2 split, recomputed from the saved lse).

Both kernels rebuild each tile's probabilities `p = exp(s - lse)` and use `delta = rowsum(dO * O) - d_lse`
(from the caller), so `ds = p * (dO V^T - delta)`. Layouts are those of `pallas_fwd`.

- dq (+ d rpb): one query tile per program over the key boxes its windows touch (the forward's walk). With a
  bias table it also sums `ds` per table entry (`tile.bias_grad`: one compare/select/sum over the tile per
  entry, the one place where the cost grows with the table) into a `[Bd, N, query tiles, 1, Pp]` fp32 partial
  (one row per program, summed by the caller): no `tokens x window` buffer.
- dk/dv: one key box per program over the query tiles that visit it (the transposed walk, exactly the same tile
  pairs), for every query head of its GQA group, so the gradients of a shared key/value head accumulate in
  place: no scatter, no overlapping-halo sum, no extra memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.kernels.common.loops import Reduction
from jaxattn.kernels.common.refs import key_slice, split_refs
from jaxattn.kernels.flash_attention.tile import matmul
from jaxattn.kernels.neighborhood_attention import tile
from jaxattn.kernels.neighborhood_attention.geometry import Geometry, Walk
from jaxattn.kernels.neighborhood_attention.pallas_fwd import (QuerySpecs, TileReader, cost_estimate, launch,
                                                               query_inputs, table_operands, walk_bounds)


def _grads(s, lse, do, v, delta):
    p = jnp.exp(s - lse)
    return p, p * (matmul(do, v, transpose_b=True) - delta)


def dq(q, k, v, bias, rpb, do, lse, delta, *, geo: Geometry, scale: float, target: str, mode: str):
    """Returns `dq [Bd, N, Sq, H]` (q dtype) and the d rpb partials `[Bd, N, query tiles, 1, Pp]` fp32 (or None).

    `bias`: the tiles (or None); `rpb`: the table rows `[N, 1, Pp]` when its gradient is wanted (or None)."""
    bd, n, _, h = q.shape
    walk, table = geo.keys_of_queries()
    red = Reduction(mode, walk.steps, axis=3)
    specs = QuerySpecs(red, geo, walk)
    names, operands, in_specs = query_inputs(specs, q, k, v, bias, rpb)
    names += ["do", "lse", "delta", "dq"]
    operands += [do, lse, delta]
    in_specs += [specs.rows(do.shape[-1]), specs.rows(1), specs.rows(1)]
    out_specs, out_shape = [specs.rows(h)], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    carry = [jax.ShapeDtypeStruct((geo.block_q, h), jnp.float32)]
    if rpb is not None:
        pp = rpb.shape[-1]
        names.append("drpb")
        out_specs.append(red.spec((None, None, None, 1, pp), lambda b, hd, i, *_: (b, hd, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((bd, n, geo.num_query_tiles, 1, pp), jnp.float32))
        carry.append(jax.ShapeDtypeStruct((1, pp), jnp.float32))
    kernel = functools.partial(_dq_kernel, names=tuple(names), geo=geo, walk=walk, red=red, scale=scale)
    cost = cost_estimate(geo, "dq", h=h, hv=v.shape[-1], itemsize=q.dtype.itemsize, bias=bias is not None,
                         rpb_grad=rpb is not None)
    outs = launch(kernel, table, operands, red=red, geo=geo, target=target, name="neighborhood_attention_dq",
                  grid=red.grid((bd, n, geo.num_query_tiles)), in_specs=in_specs, out_specs=out_specs,
                  out_shape=out_shape, scratch_shapes=red.scratch_shapes(carry), cost_estimate=cost)
    return outs[0], (outs[1] if rpb is not None else None)


def _dq_kernel(*refs, names, geo: Geometry, walk: Walk, red: Reduction, scale: float):
    ref, scratch = split_refs(refs, names)
    i = pl.program_id(2)
    ranges = walk.ranges(ref["walk"], pl.program_id(0), i)
    read = TileReader(ref, red, geo)
    q, do, lse, delta = ref["q"][...], ref["do"][...], ref["lse"][...], ref["delta"][...]
    bounds = [(ref[f"lo{a}"][...], ref[f"hi{a}"][...]) for a in range(geo.ndim)]
    q_pos = [ref[f"ii{a}"][...] for a in range(geo.ndim)] if "rpb" in ref else None
    row = ref["rpb"][...] if "rpb" in ref else None

    def step(r, carry):
        box = None if red.on_grid else walk.fori_box(ranges, r)
        keys = None if red.on_grid else key_slice(box, geo.block_k)
        k = red.tile(ref["k"], (keys, slice(None)))
        v = red.tile(ref["v"], (keys, slice(None)))
        k_pos = read.key_positions(box)
        bias = read.bias(() if red.on_grid else (geo.offset_index(i, box),))
        _, ds = _grads(tile.logits(q, k, scale, bounds, k_pos, bias), lse, do, v, delta)
        out = [carry[0] + matmul(ds.astype(k.dtype), k)]
        if row is not None:
            rel = tile.bias_index(q_pos, k_pos, geo.kernel)
            out.append(carry[1] + tile.bias_grad(rel, ds, geo.rpb_size, row.shape[-1]))
        return out

    def finish(carry):
        ref["dq"][...] = (carry[0] * scale).astype(ref["dq"].dtype)
        if row is not None:
            ref["drpb"][...] = carry[1]

    def init():
        acc = [jnp.zeros(q.shape, jnp.float32)]
        return acc + ([jnp.zeros(row.shape, jnp.float32)] if row is not None else [])

    count, valid = walk_bounds(red, walk, ranges)
    red.run(init, step, finish, start=0, count=count, scratch=scratch, valid=valid)


class KeySpecs:
    """BlockSpecs of the key-major grid `(Bd, K, key boxes[, G * query steps])` (dk/dv)."""

    def __init__(self, red: Reduction, geo: Geometry, walk: Walk):
        self.red, self.geo, self.walk = red, geo, walk

        def step_index(b, kh, j, s, table):
            return lax.div(s, walk.steps), walk.grid_box(walk.ranges(table, b, j), lax.rem(s, walk.steps))

        self.step_index = step_index

    def keys(self, width):
        return self.red.spec((None, None, self.geo.block_k, width), lambda b, kh, j, *_: (b, kh, j, 0))

    def rows(self, width):
        g, geo = self.geo.gqa, self.geo
        return self.red.reduced_spec(
            fori=((None, g, geo.seq_q, width), lambda b, kh, j, *_: (b, kh, 0, 0)),
            grid=((None, None, geo.block_q, width), lambda b, kh, j, gi, i: (b, kh * g + gi, i, 0)),
            step_index=self.step_index)

    def table(self, name):
        geo = self.geo
        if name[0] == "m":  # the program's own key box
            return self.red.spec((None, 1, geo.block_k), lambda b, kh, j, *_: (j, 0, 0))
        return self.red.reduced_spec(
            fori=((None, geo.seq_q, 1), lambda b, kh, j, *_: (lax.div(b, geo.batch), 0, 0)),
            grid=((None, geo.block_q, 1), lambda b, kh, j, gi, i: (lax.div(b, geo.batch), i, 0)),
            step_index=self.step_index)

    def bias(self):
        geo, g = self.geo, self.geo.gqa

        def step_index(b, kh, j, s, table):
            gi, i = self.step_index(b, kh, j, s, table)
            return gi, geo.offset_index(i, j)

        return self.red.reduced_spec(
            fori=((g, geo.num_offsets, geo.block_q, geo.block_k), lambda b, kh, j, *_: (kh, 0, 0, 0)),
            grid=((None, None, geo.block_q, geo.block_k), lambda b, kh, j, gi, o: (kh * g + gi, o, 0, 0)),
            step_index=step_index)


def dkv(q, k, v, bias, do, lse, delta, *, geo: Geometry, scale: float, target: str, mode: str):
    """Returns `(dk [Bd, K, Sk, H], dv [Bd, K, Sk, Hv])` in the key/value dtypes; `bias`: tiles or None."""
    bd, kv_heads, _, h = k.shape
    hv = v.shape[-1]
    walk, table = geo.queries_of_keys()
    red = Reduction(mode, geo.gqa * walk.steps, axis=3)
    specs = KeySpecs(red, geo, walk)
    names, operands = ["walk", "q", "k", "v"], [q, k, v]
    in_specs = [specs.rows(h), specs.keys(h), specs.keys(hv)]
    t_names, t_arrays = table_operands(geo, False)
    names += t_names
    operands += t_arrays
    in_specs += [specs.table(nm) for nm in t_names]
    if bias is not None:
        names.append("bias"), operands.append(bias), in_specs.append(specs.bias())
    names += ["do", "lse", "delta", "dk", "dv"]
    operands += [do, lse, delta]
    in_specs += [specs.rows(hv), specs.rows(1), specs.rows(1)]
    carry = [jax.ShapeDtypeStruct((geo.block_k, h), jnp.float32),
             jax.ShapeDtypeStruct((geo.block_k, hv), jnp.float32)]
    kernel = functools.partial(_dkv_kernel, names=tuple(names), geo=geo, walk=walk, red=red, scale=scale)
    cost = cost_estimate(geo, "dkv", h=h, hv=hv, itemsize=k.dtype.itemsize, bias=bias is not None)
    return launch(kernel, table, operands, red=red, geo=geo, target=target, name="neighborhood_attention_dkv",
                  grid=red.grid((bd, kv_heads, geo.num_key_boxes)), in_specs=in_specs,
                  out_specs=[specs.keys(h), specs.keys(hv)],
                  out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                  scratch_shapes=red.scratch_shapes(carry), cost_estimate=cost)


def _dkv_kernel(*refs, names, geo: Geometry, walk: Walk, red: Reduction, scale: float):
    ref, scratch = split_refs(refs, names)
    j = pl.program_id(2)
    ranges = walk.ranges(ref["walk"], pl.program_id(0), j)
    count = walk.count(ranges)
    # 'grid' walks a static `G x steps` rectangle and skips steps outside the ranges; 'fori' walks exactly.
    width = walk.steps if red.on_grid else jnp.maximum(count, 1)
    read = TileReader(ref, red, geo)
    k, v = ref["k"][...], ref["v"][...]
    k_pos = [ref[f"m{a}"][...] for a in range(geo.ndim)]

    def step(r, carry):
        g, rest = lax.div(r, width), lax.rem(r, width)
        query_tile = None if red.on_grid else walk.fori_box(ranges, rest)
        rows = None if red.on_grid else key_slice(query_tile, geo.block_q)
        q = red.tile(ref["q"], (g, rows, slice(None)))
        do = red.tile(ref["do"], (g, rows, slice(None)))
        lse = red.tile(ref["lse"], (g, rows, slice(None)))
        delta = red.tile(ref["delta"], (g, rows, slice(None)))
        bias = read.bias(() if red.on_grid else (g, geo.offset_index(query_tile, j)))
        s = tile.logits(q, k, scale, read.bounds(rows), k_pos, bias)
        p, ds = _grads(s, lse, do, v, delta)
        return [carry[0] + matmul(ds.astype(q.dtype), q, transpose_a=True),
                carry[1] + matmul(p.astype(do.dtype), do, transpose_a=True)]

    def finish(carry):
        ref["dk"][...] = (carry[0] * scale).astype(ref["dk"].dtype)
        ref["dv"][...] = carry[1].astype(ref["dv"].dtype)

    valid = (lambda r: walk.grid_valid(ranges, lax.rem(r, width))) if red.on_grid else None
    red.run(lambda: [jnp.zeros((geo.block_k, k.shape[-1]), jnp.float32),
                     jnp.zeros((geo.block_k, v.shape[-1]), jnp.float32)],
            step, finish, start=0, count=geo.gqa * count, scratch=scratch, valid=valid)
