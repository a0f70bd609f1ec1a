"""Pallas neighborhood-attention forward: one query tile per program, an online softmax over the key boxes its
windows touch (`geometry.Walk`), exact windows and relative position bias per tile (`tile.py`).

Kernel layout (`geometry.Geometry.to_kernel`): `q [Bd, N, Sq, H]` in query-tile order, `k [Bd, K, Sk, H]` and
`v [Bd, K, Sk, Hv]` in key-box order, `Bd = groups * B` (dilation groups lead); window tables
`lo<a>, hi<a> [groups, Sq, 1]` int32, key positions `m<a> [key boxes, 1, bk]`; bias tiles
`bias [N, offsets, bq, bk]` fp32 (one per tile offset, `Geometry.bias_index`); for the dq kernel's bias gradient
also query positions `ii<a> [Sq, 1]` and the table `rpb [N, 1, Pp]` fp32. The walk's int32 table (`walk`) is
the first operand: scalar-prefetched on TPU, a plain input in 'fori' mode. Outputs `out [Bd, N, Sq, Hv]`,
`lse [Bd, N, Sq, 1]` fp32. GQA: query head `n` reads key/value head `n // (N // K)`. `QuerySpecs`, `launch` and
`cost_estimate` are shared with the backward kernels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.core import blocking, softmax
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import cost
from jaxattn.kernels.common import platform
from jaxattn.kernels.common.loops import Reduction
from jaxattn.kernels.common.refs import key_slice, split_refs
from jaxattn.kernels.flash_attention.tile import matmul
from jaxattn.kernels.neighborhood_attention import blocks, tile
from jaxattn.kernels.neighborhood_attention.geometry import Geometry, Walk


def table_operands(geo: Geometry, with_positions: bool):
    """Names and int32 arrays of the window tables and key positions (constants of the trace)."""
    names, arrays = [], []
    for a in range(geo.ndim):
        names += [f"lo{a}", f"hi{a}"]
        arrays += [jnp.asarray(x) for x in geo.query_tables[2 * a:2 * a + 2]]
    for a in range(geo.ndim):
        names.append(f"m{a}"), arrays.append(jnp.asarray(geo.key_positions[a]))
    if with_positions:
        for a in range(geo.ndim):
            names.append(f"ii{a}"), arrays.append(jnp.asarray(geo.query_positions[a]))
    return names, arrays


class QuerySpecs:
    """BlockSpecs of the query-major grid `(Bd, N, query tiles[, key steps])` (forward and dq)."""

    def __init__(self, red: Reduction, geo: Geometry, walk: Walk):
        self.red, self.geo, self.walk = red, geo, walk
        self.step_index = lambda b, n, i, r, table: walk.grid_box(walk.ranges(table, b, i), r)

    def rows(self, width):
        return self.red.spec((None, None, self.geo.block_q, width), lambda b, n, i, *_: (b, n, i, 0))

    def kv(self, width):
        g, geo = self.geo.gqa, self.geo
        return self.red.reduced_spec(
            fori=((None, None, geo.seq_k, width), lambda b, n, i, *_: (b, lax.div(n, g), 0, 0)),
            grid=((None, None, geo.block_k, width), lambda b, n, i, box: (b, lax.div(n, g), box, 0)),
            step_index=self.step_index)

    def table(self, name):
        geo = self.geo
        if name[0] == "m":  # key positions: follow the reduction
            return self.red.reduced_spec(fori=((geo.num_key_boxes, 1, geo.block_k), lambda *_: (0, 0, 0)),
                                         grid=((None, 1, geo.block_k), lambda b, n, i, box: (box, 0, 0)),
                                         step_index=self.step_index)
        if name[0] == "i":  # query positions
            return self.red.spec((geo.block_q, 1), lambda b, n, i, *_: (i, 0))
        return self.red.spec((None, geo.block_q, 1), lambda b, n, i, *_: (lax.div(b, geo.batch), i, 0))

    def bias(self):
        geo = self.geo
        return self.red.reduced_spec(
            fori=((None, geo.num_offsets, geo.block_q, geo.block_k), lambda b, n, i, *_: (n, 0, 0, 0)),
            grid=((None, None, geo.block_q, geo.block_k), lambda b, n, i, o: (n, o, 0, 0)),
            step_index=lambda b, n, i, r, table: geo.offset_index(i, self.step_index(b, n, i, r, table)))

    def rpb(self, width):
        return self.red.spec((None, 1, width), lambda b, n, i, *_: (n, 0, 0))


def cost_estimate(geo: Geometry, phase: str, *, h: int, hv: int, itemsize: int, bias: bool, rpb_grad: bool = False):
    """`pl.CostEstimate` of one kernel from the tiles it visits (every visited pair, all heads; the arithmetic is
    `kernels/common/cost.py`'s). The rpb gradient adds one compare/select/sum per table entry and logit."""
    heads = geo.batch * geo.heads
    pairs = geo.visited_pairs * heads
    if phase == "dkv":
        own_rows = geo.seq_k * geo.groups * geo.batch * geo.kv_heads
    else:
        own_rows = geo.seq_q * geo.groups * heads
    extra = 2 * geo.rpb_size * pairs * geo.block_q * geo.block_k if rpb_grad else 0
    return cost.softmax_attention(phase, pairs=pairs, block_q=geo.block_q, block_k=geo.block_k, own_rows=own_rows,
                                  h=h, hv=hv, itemsize=itemsize, bias_itemsize=4 if bias else None,
                                  extra_flops=extra)


def launch(kernel, table, operands, *, red: Reduction, geo: Geometry, target: str, name: str, grid, in_specs,
           out_specs, out_shape, scratch_shapes, cost_estimate):
    """`pallas_call` with the walk's int32 `table` as the first operand (scalar-prefetched in 'grid' mode)."""
    params = platform.compiler_params(target, dimension_semantics=red.semantics(("parallel",) * 3),
                                      num_warps=blocks.triton_warps(geo.block_q), num_stages=blocks.TRITON_STAGES)
    common = dict(compiler_params=params, interpret=platform.interpret(target), name=name, out_shape=out_shape,
                  cost_estimate=cost_estimate)
    table = jnp.asarray(table)
    if red.on_grid:
        from jax.experimental.pallas import tpu as pltpu
        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                                 out_specs=out_specs, scratch_shapes=scratch_shapes)
        return pl.pallas_call(kernel, grid_spec=grid_spec, **common)(table, *operands)
    table = blocking.pad_axis(table, 0, common_blocks.next_power_of_2(table.shape[0]))  # Triton blocks: 2^n
    table_spec = pl.BlockSpec(table.shape, lambda *_: (0,))
    return pl.pallas_call(kernel, grid=grid, in_specs=[table_spec, *in_specs], out_specs=out_specs,
                          scratch_shapes=scratch_shapes, **common)(table, *operands)


def query_inputs(specs: QuerySpecs, q, k, v, bias, rpb=None):
    """Names, operands and BlockSpecs shared by the forward and dq kernels (`rpb`: dq's bias gradient)."""
    geo = specs.geo
    names, operands = ["walk", "q", "k", "v"], [q, k, v]
    in_specs = [specs.rows(q.shape[-1]), specs.kv(k.shape[-1]), specs.kv(v.shape[-1])]
    t_names, t_arrays = table_operands(geo, rpb is not None)
    names += t_names
    operands += t_arrays
    in_specs += [specs.table(n) for n in t_names]
    if bias is not None:
        names.append("bias"), operands.append(bias), in_specs.append(specs.bias())
    if rpb is not None:
        names.append("rpb"), operands.append(rpb), in_specs.append(specs.rpb(rpb.shape[-1]))
    return names, operands, in_specs


class TileReader:
    """Reads one tile's operands in either walk (`index` is ignored in 'grid' mode)."""

    def __init__(self, ref, red: Reduction, geo: Geometry):
        self.ref, self.red, self.nd = ref, red, geo.ndim

    def key_positions(self, box):
        """Per axis `[1, bk]`: the group index of each key of `box` (the flat key-box index; 'fori' mode)."""
        return [self.red.tile(self.ref[f"m{a}"], (box, slice(None), slice(None))) for a in range(self.nd)]

    def bounds(self, rows):
        return [(self.red.tile(self.ref[f"lo{a}"], (rows, slice(None))),
                 self.red.tile(self.ref[f"hi{a}"], (rows, slice(None)))) for a in range(self.nd)]

    def bias(self, lead):
        """The bias tile `[bq, bk]`; `lead`: its leading block indices in 'fori' mode (offset, or head and offset)."""
        if "bias" not in self.ref:
            return None
        return self.red.tile(self.ref["bias"], (*lead, slice(None), slice(None)))


def forward(q, k, v, bias, *, geo: Geometry, scale: float, target: str, mode: str):
    """Returns `(out [Bd, N, Sq, Hv] in q.dtype, lse [Bd, N, Sq, 1] fp32)`; `bias`: tiles or None."""
    bd, n, s, h = q.shape
    hv = v.shape[-1]
    walk, table = geo.keys_of_queries()
    red = Reduction(mode, walk.steps, axis=3)
    specs = QuerySpecs(red, geo, walk)
    names, operands, in_specs = query_inputs(specs, q, k, v, bias)
    names += ["out", "lse"]
    bq = geo.block_q
    carry = [jax.ShapeDtypeStruct((bq,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((bq, hv), jnp.float32)]
    kernel = functools.partial(_forward_kernel, names=tuple(names), geo=geo, walk=walk, red=red, scale=scale)
    cost = cost_estimate(geo, "fwd", h=h, hv=hv, itemsize=q.dtype.itemsize, bias=bias is not None)
    return launch(kernel, table, operands, red=red, geo=geo, target=target, name="neighborhood_attention_fwd",
                  grid=red.grid((bd, n, geo.num_query_tiles)), in_specs=in_specs,
                  out_specs=[specs.rows(hv), specs.rows(1)],
                  out_shape=[jax.ShapeDtypeStruct((bd, n, s, hv), q.dtype),
                             jax.ShapeDtypeStruct((bd, n, s, 1), jnp.float32)],
                  scratch_shapes=red.scratch_shapes(carry), cost_estimate=cost)


def walk_bounds(red: Reduction, walk: Walk, ranges):
    """`(count, valid)` arguments of `Reduction.run` for a walk over `ranges`."""
    if red.on_grid:
        return walk.steps, (lambda r: walk.grid_valid(ranges, r))
    return walk.count(ranges), None


def _forward_kernel(*refs, names, geo: Geometry, walk: Walk, red: Reduction, scale: float):
    ref, scratch = split_refs(refs, names)
    i = pl.program_id(2)
    ranges = walk.ranges(ref["walk"], pl.program_id(0), i)
    read = TileReader(ref, red, geo)
    q = ref["q"][...]
    bounds = [(ref[f"lo{a}"][...], ref[f"hi{a}"][...]) for a in range(geo.ndim)]

    def step(r, carry):
        box = None if red.on_grid else walk.fori_box(ranges, r)
        keys = None if red.on_grid else key_slice(box, geo.block_k)
        k = red.tile(ref["k"], (keys, slice(None)))
        v = red.tile(ref["v"], (keys, slice(None)))
        bias = read.bias(() if red.on_grid else (geo.offset_index(i, box),))
        s = tile.logits(q, k, scale, bounds, read.key_positions(box), bias)
        return list(softmax.online_softmax_update(tuple(carry), s, v, lambda p, vv: matmul(p.astype(vv.dtype), vv)))

    def finish(carry):
        out, lse = softmax.online_softmax_finalize(tuple(carry))
        ref["out"][...] = out.astype(ref["out"].dtype)
        ref["lse"][...] = lse[:, None]

    count, valid = walk_bounds(red, walk, ranges)
    red.run(lambda: list(softmax.online_softmax_init((geo.block_q,), ref["v"].shape[-1])), step, finish,
            start=0, count=count, scratch=scratch, valid=valid)
