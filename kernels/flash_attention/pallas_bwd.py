"""Pallas flash-attention backward (FlashAttention-2 split): a dk/dv kernel and a dq (+ dlogits for dbias) kernel.

Both recompute each visited tile's probabilities from the saved log-sum-exp, `p = exp(s - lse)`, and use
`delta = rowsum(dO * O) - d_lse` (computed by the caller), so `ds = p * (dO V^T - delta)`. Layouts are those of
`pallas_fwd`; `lse` and `delta` are `[B, N, Tp, 1]` fp32 with empty rows' `lse` already replaced by 0.

- dk/dv: one key block per program, looping over the query blocks that see it for every query head of its GQA
  group, so dk/dv of a shared key/value head are accumulated in place (k/v are never repeated).
- dq: one query block per program over the key blocks it sees (the forward's grid). When the bias needs a
  gradient it also writes `ds` into a zero-initialised `[B, N, Tp, Sp]` fp32 array (aliased in place); the caller
  sums it over the bias's broadcast axes.

With a soft cap, `ds` is the gradient of the capped logits (what dbias takes) and the gradient reaching q and k is
`ds * (1 - tanh^2)`. Sinks need nothing here: `lse` includes them (their gradient is `-sum p_sink * delta`, taken
by the caller). With a dynamic walk (`walk.py`) both kernels read their own table, as the forward does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.kernels.common import bands
from jaxattn.kernels.common.loops import Reduction
from jaxattn.kernels.flash_attention import tile
from jaxattn.kernels.common.refs import key_slice, split_refs
from jaxattn.kernels.flash_attention.pallas_fwd import (KeyWalk, QuerySpecs, inputs, key_block_logits, launch,
                                                        query_walk)
from jaxattn.kernels.flash_attention.walk import Walk


def _grads(logits, lse, do, v, delta):
    """The shared core of both kernels: `(p, ds, ds_qk)` of one tile, `ds` the gradient of the scaled, capped,
    biased logits, `ds_qk` that of the scaled logits before the cap (`ds` without a cap)."""
    s, cap_derivative = logits
    p = tile.probabilities(s, lse)
    dp = tile.matmul(do, v, transpose_b=True)
    ds = p * (dp - delta)
    return p, ds, (ds if cap_derivative is None else ds * cap_derivative)


def dq(q, k, v, bias, q_seg, k_seg, do, lse, delta, walk_table=None, *, want_dbias: bool, problem: tile.Problem,
       block_q: int, block_k: int, target: str, mode: str, cost_estimate: pl.CostEstimate | None = None):
    """Returns `dq [B, N, Tp, H]` (q dtype) and `ds [B, N, Tp, Sp]` fp32 (None unless `want_dbias`)."""
    b, n, tp, h = q.shape
    kv_heads, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = tp // block_q, sp // block_k
    steps, walk, table = query_walk(problem, walk_table, nk, block_q, block_k)
    red = Reduction(mode, steps, axis=3)
    specs = QuerySpecs(red, problem, batch=b, heads=n, kv_heads=kv_heads, block_q=block_q, block_k=block_k,
                       q_len_p=tp, kv_len_p=sp, bias_shape=None if bias is None else bias.shape, walk=walk)
    names, operands, in_specs = inputs(specs, specs.kv, q, k, v, bias, q_seg, k_seg)
    names = (["walk"] if walk else []) + names + ["do", "lse", "delta"]
    operands += [do, lse, delta]
    in_specs += [specs.rows(hv), specs.rows(1), specs.rows(1)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [specs.rows(h)]
    aliases = {}
    if want_dbias:
        full = (b, n, tp, sp)
        # Tiles outside the band are never visited: start from zeros (aliased) rather than writing them.
        aliases = {len(operands) + (table is not None): 1}
        names.append("ds_init"), operands.append(jnp.zeros(full, jnp.float32))
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        out_shape.append(jax.ShapeDtypeStruct(full, jnp.float32))
        out_specs.append(specs.bias(shape=full))
    names += ["dq"] + (["ds"] if want_dbias else [])
    kernel = functools.partial(_dq_kernel, names=tuple(names), problem=problem, walk=walk, block_q=block_q,
                               block_k=block_k, num_k=nk, red=red, mask_kv_tail=sp > problem.kv_len)
    outs = launch(
        kernel, operands, red=red, phase="bwd", target=target, name="flash_attention_dq", table=table,
        grid=red.grid((b, n, nq)),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=red.scratch_shapes([jax.ShapeDtypeStruct((block_q, h), jnp.float32)]),
        input_output_aliases=aliases,
        cost_estimate=cost_estimate,
    )
    return outs[0], (outs[1] if want_dbias else None)


def _dq_kernel(*refs, names, problem, walk, block_q, block_k, num_k, red, mask_kv_tail):
    ref, scratch = split_refs(refs, names)
    i = pl.program_id(2)
    keys = KeyWalk(ref, problem, walk, i, block_q=block_q, block_k=block_k, num_k=num_k, mask_kv_tail=mask_kv_tail)
    q, do, lse, delta = ref["q"][...], ref["do"][...], ref["lse"][...], ref["delta"][...]
    q_seg = ref["q_seg"][...] if "q_seg" in ref else None

    def step(r, carry):
        logits, k, v, cols = key_block_logits(ref, red, keys.block(r), q, q_seg, i * block_q, block_k=block_k,
                                              problem=problem, mask=keys.mask, with_cap_derivative=True)
        _, ds, ds_qk = _grads(logits, lse, do, v, delta)
        if "ds" in ref:
            red.store(ref["ds"], cols, ds)
        return [carry[0] + tile.matmul(ds_qk.astype(k.dtype), k)]

    def finish(carry):
        ref["dq"][...] = (carry[0] * problem.scale).astype(ref["dq"].dtype)

    if "ds" in ref and red.on_grid:
        # A query block that sees no key still owns one (re-mapped) dlogits block, which the pipeline writes
        # back: it must hold zeros, not whatever VMEM held.
        @pl.when((keys.count == 0) & (pl.program_id(3) == 0))
        def _empty_band():
            ref["ds"][...] = jnp.zeros(ref["ds"].shape, ref["ds"].dtype)

    red.run(lambda: [jnp.zeros(q.shape, jnp.float32)], step, finish, start=keys.start, count=keys.count,
            scratch=scratch)


class KeySpecs:
    """BlockSpecs of a grid `(B, K, Sp / bk[, query steps])` reducing over (query head of the group, query block)."""

    def __init__(self, red: Reduction, problem: tile.Problem, *, batch, heads, kv_heads, block_q, block_k,
                 q_len_p, span, bias_shape=None, walk: Walk | None = None):
        self.red, self.bq, self.bk, self.tp = red, block_q, block_k, q_len_p
        self.groups = heads // kv_heads
        self.nq = q_len_p // block_q
        self.batch, self.heads, self.bias_shape = batch, heads, bias_shape

        def step_index(b, kh, j, s, *table):
            g = lax.div(s, span)
            if walk is not None:
                return g, walk.block(table[0], b, kh * self.groups + g, j, lax.rem(s, span))
            first, stop = problem.q_blocks(j, block_k, block_q, self.nq)
            return g, bands.step_block(first, stop, lax.rem(s, span), self.nq)

        self.step_index = step_index

    def keys(self, width):
        return self.red.spec((None, None, self.bk, width), lambda b, kh, j, *_: (b, kh, j, 0))

    def rows(self, width):
        """Tiles `[bq, width]` of a `[B, N, Tp, width]` array for every query head of key head `kh`'s group."""
        g = self.groups
        return self.red.reduced_spec(
            fori=((None, g, self.tp, width), lambda b, kh, j, *_: (b, kh, 0, 0)),
            grid=((None, None, self.bq, width), lambda b, kh, j, gi, i: (b, kh * g + gi, i, 0)),
            step_index=self.step_index)

    def bias(self):
        bb, nb = self.bias_shape[:2]
        g = self.groups
        per_head = nb == self.heads and nb > 1

        def lead(b):
            return b if bb == self.batch and bb > 1 else 0

        return self.red.reduced_spec(
            fori=((None, g if per_head else 1, self.tp, self.bk),
                  lambda b, kh, j, *_: (lead(b), kh if per_head else 0, 0, j)),
            grid=((None, None, self.bq, self.bk),
                  lambda b, kh, j, gi, i: (lead(b), kh * g + gi if per_head else 0, i, j)),
            step_index=self.step_index)

    def q_segments(self):
        return self.red.reduced_spec(
            fori=((None, self.tp, 1), lambda b, kh, j, *_: (b, 0, 0)),
            grid=((None, self.bq, 1), lambda b, kh, j, gi, i: (b, i, 0)),
            step_index=self.step_index)

    def k_segments(self):
        return self.red.spec((None, 1, self.bk), lambda b, kh, j, *_: (b, 0, j))


def dkv(q, k, v, bias, q_seg, k_seg, do, lse, delta, walk_table=None, *, problem: tile.Problem, block_q: int,
        block_k: int, target: str, mode: str, cost_estimate: pl.CostEstimate | None = None):
    """Returns `(dk [B, K, Sp, H], dv [B, K, Sp, Hv])` in the key/value dtypes. `walk_table`: the key-major
    `walk.build(...)` for this kernel's tiles when `problem.dynamic`."""
    b, n, tp, h = q.shape
    kv_heads, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    groups = n // kv_heads
    nq, nk = tp // block_q, sp // block_k
    walk, table = walk_table if walk_table is not None else (None, None)
    span = problem.max_q_blocks(block_k, block_q, nq) if walk is None else walk.steps
    red = Reduction(mode, groups * span, axis=3)
    specs = KeySpecs(red, problem, batch=b, heads=n, kv_heads=kv_heads, block_q=block_q, block_k=block_k,
                     q_len_p=tp, span=span, bias_shape=None if bias is None else bias.shape, walk=walk)
    names, operands, in_specs = inputs(specs, specs.keys, q, k, v, bias, q_seg, k_seg)
    names = (["walk"] if walk else []) + names + ["do", "lse", "delta", "dk", "dv"]
    operands += [do, lse, delta]
    in_specs += [specs.rows(hv), specs.rows(1), specs.rows(1)]
    carry = [jax.ShapeDtypeStruct((block_k, h), jnp.float32), jax.ShapeDtypeStruct((block_k, hv), jnp.float32)]
    kernel = functools.partial(_dkv_kernel, names=tuple(names), problem=problem, walk=walk, block_q=block_q,
                               block_k=block_k, num_q=nq, groups=groups, span=span, red=red,
                               mask_kv_tail=sp > problem.kv_len)
    return launch(
        kernel, operands, red=red, phase="bwd", target=target, name="flash_attention_dkv", table=table,
        grid=red.grid((b, kv_heads, nk)),
        in_specs=in_specs,
        out_specs=[specs.keys(h), specs.keys(hv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=red.scratch_shapes(carry),
        cost_estimate=cost_estimate,
    )


class QueryWalk:
    """The query tiles that see key block `j` (this program's), per query head `g` of its GQA group: the static
    band (the same for every head), or the walk table's lists."""

    def __init__(self, ref, problem: tile.Problem, walk: Walk | None, j, *, groups, block_q, block_k, num_q,
                 mask_kv_tail):
        if walk is None:
            first, stop = problem.q_blocks(j, block_k, block_q, num_q)
            static_mask = tile.TileMask.static(problem, mask_kv_tail=mask_kv_tail)
            self.per_head = False
            self.count = lambda g: stop - first
            self.block = lambda g, r: first + r
            self.mask = lambda g: static_mask
        else:
            table, b, kh = ref["walk"], pl.program_id(0), pl.program_id(1)
            self.per_head = walk.heads > 1
            self.count = lambda g: walk.count(table, b, kh * groups + g, j)
            self.block = lambda g, r: walk.block(table, b, kh * groups + g, j, r)
            self.mask = lambda g: walk.tile_mask(table, problem, b, kh * groups + g)


def _dkv_kernel(*refs, names, problem, walk, block_q, block_k, num_q, groups, span, red, mask_kv_tail):
    ref, scratch = split_refs(refs, names)
    j = pl.program_id(2)
    queries = QueryWalk(ref, problem, walk, j, groups=groups, block_q=block_q, block_k=block_k, num_q=num_q,
                        mask_kv_tail=mask_kv_tail)
    # 'grid' walks a static `groups x span` rectangle and skips each head's steps past its count; 'fori' walks
    # exactly when the heads share one list, else the rectangle, skipping the same steps.
    exact = not (red.on_grid or queries.per_head)
    width = jnp.maximum(queries.count(0), 1) if exact else span
    count = groups * queries.count(0) if exact else groups * span
    k, v = ref["k"][...], ref["v"][...]
    k_seg = ref["k_seg"][...] if "k_seg" in ref else None

    def valid(r):
        return lax.rem(r, width) < queries.count(lax.div(r, width))

    def step(r, carry):
        g = lax.div(r, width)
        i = queries.block(g, lax.rem(r, width))
        rows = key_slice(i, block_q)
        q = red.tile(ref["q"], (g, rows, slice(None)))
        do = red.tile(ref["do"], (g, rows, slice(None)))
        lse = red.tile(ref["lse"], (g, rows, slice(None)))
        delta = red.tile(ref["delta"], (g, rows, slice(None)))
        bias = None
        if "bias" in ref:
            head = g if ref["bias"].ndim == 3 and ref["bias"].shape[0] > 1 else 0  # fori block: [Gb, Tp, bk]
            bias = red.tile(ref["bias"], (head, rows, slice(None)))
        q_seg = red.tile(ref["q_seg"], (rows, slice(None))) if "q_seg" in ref else None
        logits = tile.logits(q, k, bias, q_seg, k_seg, i * block_q, j * block_k, problem, mask=queries.mask(g),
                             with_cap_derivative=True)
        p, _, ds_qk = _grads(logits, lse, do, v, delta)
        dk = carry[0] + tile.matmul(ds_qk.astype(q.dtype), q, transpose_a=True)
        dv = carry[1] + tile.matmul(p.astype(do.dtype), do, transpose_a=True)
        return [dk, dv]

    def finish(carry):
        ref["dk"][...] = (carry[0] * problem.scale).astype(ref["dk"].dtype)
        ref["dv"][...] = carry[1].astype(ref["dv"].dtype)

    walk_step = step
    if not red.on_grid and not exact:
        def walk_step(r, carry):
            return lax.cond(valid(r), step, lambda _, c: c, r, carry)

    red.run(lambda: [jnp.zeros((block_k, k.shape[-1]), jnp.float32), jnp.zeros((block_k, v.shape[-1]), jnp.float32)],
            walk_step, finish, start=0, count=count, scratch=scratch, valid=valid)
