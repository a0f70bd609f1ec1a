"""Pallas flash-attention forward: one query block per program, an online softmax over the key blocks it sees.

Kernel layout (the wrapper in `pallas.py` converts): heads-major and padded to whole blocks,
`q [B, N, Tp, H]`, `k [B, K, Sp, H]`, `v [B, K, Sp, Hv]`, `bias [Bb, Nb, Tp, Sp]` (Bb in {1, B}, Nb in {1, N}:
broadcast over batch/heads through the index maps, never copied), segment ids as a column `[B, Tp, 1]` and a
row `[B, 1, Sp]`, `lse [B, N, Tp, 1]` fp32. GQA: query head `n` reads key/value head `n // (N // K)`.
Attention sinks come as `sinks [1, N, Tp, 1]` fp32 (the head's sink logit on every row): the online softmax
starts from them as from a key with no value, so `lse` includes them. With a dynamic walk (`walk.py`) its int32
table is the first operand (scalar-prefetched on TPU) and gives each tile its key blocks and its mask.
`QuerySpecs` holds the BlockSpecs of this query-major grid, reused by the dq kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.core import blocking, softmax
from jaxattn.kernels.common import bands, platform
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common.loops import Reduction
from jaxattn.kernels.common.refs import key_slice, split_refs
from jaxattn.kernels.flash_attention import tile
from jaxattn.kernels.flash_attention.blocks import TRITON_LAUNCH
from jaxattn.kernels.flash_attention.walk import Walk


class QuerySpecs:
    """BlockSpecs of a grid `(B, N, Tp / bq[, key steps])` reducing over key blocks (forward and dq kernels)."""

    def __init__(self, red: Reduction, problem: tile.Problem, *, batch, heads, kv_heads, block_q, block_k,
                 q_len_p, kv_len_p, bias_shape=None, walk: Walk | None = None):
        self.red, self.bq, self.bk, self.sp = red, block_q, block_k, kv_len_p
        self.groups = heads // kv_heads
        self.nk = kv_len_p // block_k
        self.bias_shape = bias_shape
        self.batch, self.heads = batch, heads

        def step_index(b, n, i, j, *table):
            if walk is not None:  # the table lists the blocks, the last one repeated
                return walk.block(table[0], b, n, i, j)
            first, stop = problem.kv_blocks(i, block_q, block_k, self.nk)
            return bands.step_block(first, stop, j, self.nk)

        self.step_index = step_index

    def rows(self, width):
        """A `[bq, width]` block of a `[B, N, Tp, width]` array (queries, outputs, lse)."""
        return self.red.spec((None, None, self.bq, width), lambda b, n, i, *_: (b, n, i, 0))

    def head_rows(self):
        """A `[bq, 1]` block of a `[1, N, Tp, 1]` array (the sinks, the same for every batch row)."""
        return self.red.spec((None, None, self.bq, 1), lambda b, n, i, *_: (0, n, i, 0))

    def kv(self, width):
        """Key/value tiles `[bk, width]` of `[B, K, Sp, width]`, read by query head `n` from head `n // G`."""
        g = self.groups
        return self.red.reduced_spec(
            fori=((None, None, self.sp, width), lambda b, n, i, *_: (b, lax.div(n, g), 0, 0)),
            grid=((None, None, self.bk, width), lambda b, n, i, r: (b, lax.div(n, g), r, 0)),
            step_index=self.step_index)

    def bias(self, shape=None):
        """`[bq, bk]` tiles of a `[Bb, Nb, Tp, Sp]` bias (or of the per-head dbias when `shape` is full)."""
        bb, nb = (shape or self.bias_shape)[:2]

        def lead(b, n):
            return (b if bb == self.batch and bb > 1 else 0), (n if nb == self.heads and nb > 1 else 0)

        return self.red.reduced_spec(
            fori=((None, None, self.bq, self.sp), lambda b, n, i, *_: (*lead(b, n), i, 0)),
            grid=((None, None, self.bq, self.bk), lambda b, n, i, r: (*lead(b, n), i, r)),
            step_index=self.step_index)

    def q_segments(self):
        return self.red.spec((None, self.bq, 1), lambda b, n, i, *_: (b, i, 0))

    def k_segments(self):
        return self.red.reduced_spec(
            fori=((None, 1, self.sp), lambda b, n, i, *_: (b, 0, 0)),
            grid=((None, 1, self.bk), lambda b, n, i, r: (b, 0, r)),
            step_index=self.step_index)


def inputs(specs, kv_spec, q, k, v, bias, q_seg, k_seg, sinks=None):
    """`(names, operands, in_specs)` of what every kernel reads: q, k, v, then the bias, segment ids and sinks if
    given."""
    names, operands = ["q", "k", "v"], [q, k, v]
    in_specs = [specs.rows(q.shape[-1]), kv_spec(k.shape[-1]), kv_spec(v.shape[-1])]
    if bias is not None:
        names.append("bias"), operands.append(bias), in_specs.append(specs.bias())
    if q_seg is not None:
        names += ["q_seg", "k_seg"]
        operands += [q_seg, k_seg]
        in_specs += [specs.q_segments(), specs.k_segments()]
    if sinks is not None:
        names.append("sinks"), operands.append(sinks), in_specs.append(specs.head_rows())
    return names, operands, in_specs


def launch(kernel, operands, *, red, phase, target, name, table=None, grid, in_specs, out_specs, scratch_shapes=(),
           **call_kwargs):
    """`pallas_call` over `red`'s grid with this platform's compiler parameters (all grid axes parallel). A walk
    `table` becomes the first operand: scalar-prefetched in 'grid' mode, a plain input in 'fori' mode."""
    warps, stages = TRITON_LAUNCH[phase]
    common = dict(compiler_params=platform.compiler_params(target, dimension_semantics=red.semantics(("parallel",) * 3),
                                                           num_warps=warps, num_stages=stages),
                  interpret=platform.interpret(target), name=name, **call_kwargs)
    if table is not None and red.on_grid:
        from jax.experimental.pallas import tpu as pltpu
        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                                 out_specs=out_specs, scratch_shapes=scratch_shapes)
        return pl.pallas_call(kernel, grid_spec=grid_spec, **common)(table, *operands)
    if table is not None:
        table = blocking.pad_axis(table, 0, common_blocks.next_power_of_2(table.shape[0]))  # Triton blocks: 2^n
        in_specs = [pl.BlockSpec(table.shape, lambda *_: (0,)), *in_specs]
        operands = [table, *operands]
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch_shapes,
                          **common)(*operands)


class KeyWalk:
    """The key blocks of query tile `i` (this program's): the static band, or the walk table's list."""

    def __init__(self, ref, problem: tile.Problem, walk: Walk | None, i, *, block_q, block_k, num_k, mask_kv_tail):
        if walk is None:
            first, stop = problem.kv_blocks(i, block_q, block_k, num_k)
            self.start, self.count = first, stop - first
            self.block = lambda r: r
            self.mask = tile.TileMask.static(problem, mask_kv_tail=mask_kv_tail)
        else:
            table, b, n = ref["walk"], pl.program_id(0), pl.program_id(1)
            self.start, self.count = 0, walk.count(table, b, n, i)
            self.block = lambda r: walk.block(table, b, n, i, r)
            self.mask = walk.tile_mask(table, problem, b, n)


def key_block_logits(ref, red, r, q, q_seg, q_start, *, block_k, problem, mask, with_cap_derivative=False):
    """Loads key block `r` (k, v and, if present, bias and key segment tiles) for a query tile; returns
    `(logits, k, v, cols)` (logits `(s, cap derivative)` if asked), `cols` the index of the tile's columns in
    `[bq, Sp]`-shaped refs."""
    keys = key_slice(r, block_k)
    cols = (slice(None), keys)
    k = red.tile(ref["k"], (keys, slice(None)))
    v = red.tile(ref["v"], (keys, slice(None)))
    bias = red.tile(ref["bias"], cols) if "bias" in ref else None
    k_seg = red.tile(ref["k_seg"], cols) if "k_seg" in ref else None
    s = tile.logits(q, k, bias, q_seg, k_seg, q_start, r * block_k, problem, mask=mask,
                    with_cap_derivative=with_cap_derivative)
    return s, k, v, cols


def softmax_init(ref, block_q: int, value_dim: int):
    """The online softmax's first carry; with sinks, the sink is a key with no value (max = sink, sum = 1)."""
    m, l, acc = softmax.online_softmax_init((block_q,), value_dim)
    if "sinks" in ref:
        m = ref["sinks"][...][:, 0]
        l = jnp.where(jnp.isfinite(m), 1.0, 0.0).astype(jnp.float32)
    return [m, l, acc]


def query_walk(problem: tile.Problem, walk_table, num_k: int, block_q: int, block_k: int):
    """`(Reduction steps, walk, table)` of a query-major kernel; `walk_table` is `walk.build`'s result or None."""
    if walk_table is None:
        return problem.max_kv_blocks(block_q, block_k, num_k), None, None
    walk, table = walk_table
    return walk.steps, walk, table


def forward(q, k, v, bias, q_seg, k_seg, sinks=None, walk_table=None, *, problem: tile.Problem, block_q: int,
            block_k: int, target: str, mode: str, cost_estimate: pl.CostEstimate | None = None):
    """Returns `(out [B, N, Tp, Hv] in q.dtype, lse [B, N, Tp, 1] fp32)`; rows that see no key (nor a sink): 0 and
    -inf. `walk_table`: `walk.build(...)` for this kernel's tiles when `problem.dynamic`."""
    b, n, tp, h = q.shape
    kv_heads, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = tp // block_q, sp // block_k
    steps, walk, table = query_walk(problem, walk_table, nk, block_q, block_k)
    red = Reduction(mode, steps, axis=3)
    specs = QuerySpecs(red, problem, batch=b, heads=n, kv_heads=kv_heads, block_q=block_q, block_k=block_k,
                       q_len_p=tp, kv_len_p=sp, bias_shape=None if bias is None else bias.shape, walk=walk)
    names, operands, in_specs = inputs(specs, specs.kv, q, k, v, bias, q_seg, k_seg, sinks)
    names = (["walk"] if walk else []) + names + ["out", "lse"]
    carry = [jax.ShapeDtypeStruct((block_q,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((block_q, hv), jnp.float32)]
    kernel = functools.partial(_forward_kernel, names=tuple(names), problem=problem, walk=walk, block_q=block_q,
                               block_k=block_k, num_k=nk, red=red, mask_kv_tail=sp > problem.kv_len)
    return launch(
        kernel, operands, red=red, phase="fwd", target=target, name="flash_attention_fwd", table=table,
        grid=red.grid((b, n, nq)),
        in_specs=in_specs,
        out_specs=[specs.rows(hv), specs.rows(1)],
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype), jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)],
        scratch_shapes=red.scratch_shapes(carry),
        cost_estimate=cost_estimate,
    )


def _forward_kernel(*refs, names, problem, walk, block_q, block_k, num_k, red, mask_kv_tail):
    ref, scratch = split_refs(refs, names)
    i = pl.program_id(2)
    keys = KeyWalk(ref, problem, walk, i, block_q=block_q, block_k=block_k, num_k=num_k, mask_kv_tail=mask_kv_tail)
    q = ref["q"][...]
    q_seg = ref["q_seg"][...] if "q_seg" in ref else None

    def step(r, carry):
        s, _, v, _ = key_block_logits(ref, red, keys.block(r), q, q_seg, i * block_q, block_k=block_k,
                                      problem=problem, mask=keys.mask)
        return list(softmax.online_softmax_update(
            tuple(carry), s, v, lambda p, vv: tile.matmul(p.astype(vv.dtype), vv)))

    def finish(carry):
        out, lse = softmax.online_softmax_finalize(tuple(carry))
        ref["out"][...] = out.astype(ref["out"].dtype)
        ref["lse"][...] = lse[:, None]

    red.run(lambda: softmax_init(ref, block_q, ref["v"].shape[-1]), step, finish, start=keys.start,
            count=keys.count, scratch=scratch)
