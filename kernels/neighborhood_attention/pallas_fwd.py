"""Pallas neighborhood-attention forward: one query box per program, an online softmax over the key boxes of its
halo (`geometry.Walk`), exact windows and relative position bias per tile (`tile.py`).

Kernel layout (`geometry.Geometry.to_kernel`): `q [Bd, N, S, H]`, `k [Bd, K, S, H]`, `v [Bd, K, S, Hv]` with
`Bd = groups * B` (dilation groups lead) and `S` the box-major flattened group grid; window tables
`lo<a>, hi<a> [groups, S, 1]` int32, key positions `m<a> [1, S]`; bias tiles `bias [N, offsets, bq, bk]` fp32
(one per box offset, `Geometry.bias_index`); for the dq kernel's bias gradient also query positions
`ii<a> [S, 1]` and the table `rpb [N, 1, Pp]` fp32. Outputs `out [Bd, N, S, Hv]`, `lse [Bd, N, S, 1]` fp32.
GQA: query head `n` reads key/value head `n // (N // K)`. `QuerySpecs` is shared with the dq kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.core import softmax
from jaxattn.kernels.common import platform
from jaxattn.kernels.common.loops import Reduction
from jaxattn.kernels.common.refs import key_slice, split_refs
from jaxattn.kernels.flash_attention.tile import matmul
from jaxattn.kernels.neighborhood_attention import tile
from jaxattn.kernels.neighborhood_attention.blocks import TRITON_LAUNCH
from jaxattn.kernels.neighborhood_attention.geometry import Geometry, Walk


def table_operands(geo: Geometry, with_positions: bool):
    """Names and int32 arrays of the window tables (constants of the trace)."""
    names, arrays = [], []
    for a in range(geo.ndim):
        names += [f"lo{a}", f"hi{a}"]
        arrays += [jnp.asarray(x) for x in geo.query_tables[2 * a:2 * a + 2]]
    for a in range(geo.ndim):
        names.append(f"m{a}"), arrays.append(jnp.asarray(geo.positions[a]))
    if with_positions:
        for a in range(geo.ndim):
            names.append(f"ii{a}"), arrays.append(jnp.asarray(geo.positions[a].reshape(-1, 1)))
    return names, arrays


class QuerySpecs:
    """BlockSpecs of the query-major grid `(Bd, N, boxes[, key steps])` (forward and dq)."""

    def __init__(self, red: Reduction, geo: Geometry, walk: Walk):
        self.red, self.geo, self.walk = red, geo, walk
        self.step_index = lambda b, n, i, j: walk.grid_box(walk.ranges(i), j)

    def rows(self, width):
        return self.red.spec((None, None, self.geo.block, width), lambda b, n, i: (b, n, i, 0))

    def kv(self, width):
        g = self.geo.gqa
        return self.red.reduced_spec(
            fori=((None, None, self.geo.seq, width), lambda b, n, i: (b, lax.div(n, g), 0, 0)),
            grid=((None, None, self.geo.block, width), lambda b, n, i, r: (b, lax.div(n, g), r, 0)),
            step_index=self.step_index)

    def table(self, name):
        bq, batch = self.geo.block, self.geo.batch
        if name[0] == "m":  # key positions: follow the reduction
            return self.red.reduced_spec(fori=((1, self.geo.seq), lambda b, n, i: (0, 0)),
                                         grid=((1, bq), lambda b, n, i, r: (0, r)), step_index=self.step_index)
        if name[0] == "i":  # query positions
            return self.red.spec((bq, 1), lambda b, n, i: (i, 0))
        return self.red.spec((None, bq, 1), lambda b, n, i: (lax.div(b, batch), i, 0))

    def bias(self):
        geo, walk = self.geo, self.walk
        return self.red.reduced_spec(
            fori=((None, geo.num_offsets, geo.block, geo.block), lambda b, n, i: (n, 0, 0, 0)),
            grid=((None, None, geo.block, geo.block), lambda b, n, i, o: (n, o, 0, 0)),
            step_index=lambda b, n, i, j: geo.offset_index(i, walk.grid_box(walk.ranges(i), j)))

    def rpb(self, width):
        return self.red.spec((None, 1, width), lambda b, n, i: (n, 0, 0))


def launch(kernel, operands, *, red: Reduction, phase: str, target: str, name: str, **call):
    warps, stages = TRITON_LAUNCH[phase]
    return pl.pallas_call(
        kernel,
        compiler_params=platform.compiler_params(target, dimension_semantics=red.semantics(("parallel",) * 3),
                                                 num_warps=warps, num_stages=stages),
        interpret=platform.interpret(target), name=name, **call)(*operands)


def query_inputs(specs: QuerySpecs, q, k, v, bias, rpb=None):
    """Names, operands and BlockSpecs shared by the forward and dq kernels (`rpb`: dq's bias gradient)."""
    geo = specs.geo
    names, operands = ["q", "k", "v"], [q, k, v]
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

    def key_positions(self, keys):
        return [self.red.tile(self.ref[f"m{a}"], (slice(None), keys)) for a in range(self.nd)]

    def bounds(self, rows):
        return [(self.red.tile(self.ref[f"lo{a}"], (rows, slice(None))),
                 self.red.tile(self.ref[f"hi{a}"], (rows, slice(None)))) for a in range(self.nd)]

    def bias(self, lead):
        """The bias tile `[bq, bk]`; `lead`: its leading block indices in 'fori' mode (offset, or head and offset)."""
        if "bias" not in self.ref:
            return None
        return self.red.tile(self.ref["bias"], (*lead, slice(None), slice(None)))


def forward(q, k, v, bias, *, geo: Geometry, scale: float, target: str, mode: str):
    """Returns `(out [Bd, N, S, Hv] in q.dtype, lse [Bd, N, S, 1] fp32)`; `bias`: tiles or None."""
    bd, n, s, _ = q.shape
    hv = v.shape[-1]
    walk = Walk.keys_of_queries(geo)
    red = Reduction(mode, walk.steps, axis=3)
    specs = QuerySpecs(red, geo, walk)
    names, operands, in_specs = query_inputs(specs, q, k, v, bias)
    names += ["out", "lse"]
    bq = geo.block
    carry = [jax.ShapeDtypeStruct((bq,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((bq, hv), jnp.float32)]
    kernel = functools.partial(_forward_kernel, names=tuple(names), geo=geo, walk=walk, red=red, scale=scale)
    return launch(kernel, operands, red=red, phase="fwd", target=target, name="neighborhood_attention_fwd",
                  grid=red.grid((bd, n, geo.num_boxes)), in_specs=in_specs,
                  out_specs=[specs.rows(hv), specs.rows(1)],
                  out_shape=[jax.ShapeDtypeStruct((bd, n, s, hv), q.dtype),
                             jax.ShapeDtypeStruct((bd, n, s, 1), jnp.float32)],
                  scratch_shapes=red.scratch_shapes(carry))


def walk_bounds(red: Reduction, walk: Walk, ranges):
    """`(count, valid)` arguments of `Reduction.run` for a walk over `ranges`."""
    if red.on_grid:
        return walk.steps, (lambda r: walk.grid_valid(ranges, r))
    return walk.count(ranges), None


def _forward_kernel(*refs, names, geo: Geometry, walk: Walk, red: Reduction, scale: float):
    ref, scratch = split_refs(refs, names)
    i = pl.program_id(2)
    ranges = walk.ranges(i)
    read = TileReader(ref, red, geo)
    q = ref["q"][...]
    bounds = [(ref[f"lo{a}"][...], ref[f"hi{a}"][...]) for a in range(geo.ndim)]

    def step(r, carry):
        box = None if red.on_grid else walk.fori_box(ranges, r)
        keys = None if red.on_grid else key_slice(box, geo.block)
        k = red.tile(ref["k"], (keys, slice(None)))
        v = red.tile(ref["v"], (keys, slice(None)))
        bias = read.bias(() if red.on_grid else (geo.offset_index(i, box),))
        s = tile.logits(q, k, scale, bounds, read.key_positions(keys), bias)
        return list(softmax.online_softmax_update(tuple(carry), s, v, lambda p, vv: matmul(p.astype(vv.dtype), vv)))

    def finish(carry):
        out, lse = softmax.online_softmax_finalize(tuple(carry))
        ref["out"][...] = out.astype(ref["out"].dtype)
        ref["lse"][...] = lse[:, None]

    count, valid = walk_bounds(red, walk, ranges)
    red.run(lambda: list(softmax.online_softmax_init((geo.block,), ref["v"].shape[-1])), step, finish,
            start=0, count=count, scratch=scratch, valid=valid)
