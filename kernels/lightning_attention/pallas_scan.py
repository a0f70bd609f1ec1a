"""The Pallas lightning scan: one program per (batch, head, state column tile), blocks of rows in time order.

Kernel layout (the wrapper in `pallas.py` converts): heads-major, rows padded with zeros to whole blocks,
`a, b [B, N, Tp, Da]`, `c [B, N, Tp, Dc]`, `init`/`state [B, N, Da, Dc]` fp32, `slopes [N, 1, 1]` fp32. The
semantics are those of `vjp.py` (forward or reverse in time). One step handles a block of `L` rows `r`:
  intra:  `O = ((A B^T) * D) C`, `D[r, c] = lambda^(r-c)` for `r >= c` (forward) or `lambda^(c-r)` for `c >= r`;
  inter:  `O += lambda^(e_r) (A S)`, the state entering the block;
  update: `S <- lambda^(n) S + (B * lambda^(w_c))^T C`.
Forward: `e_r = r + 1`, `w_c = n_valid - 1 - c`, `n = n_valid` (`n_valid` real rows in the block: exact for a
padded tail, whose zero rows add nothing). Reverse (blocks from last to first): `e_r = n_end - r`, `w_c = c`,
`n = n_end`, with `n_end = L` except in the block holding the last real row, where `n_end = n_valid - 1` (the
initial state of the reverse recurrence enters at that row, undecayed). Exponents are clamped at 0, so nothing
overflows; an exponent of a padded row only ever multiplies zeros.

Packed documents (`docs`, document ids `[B, Tp]` padded with the edge id): the masks of `jaxattn.core.segments`
come in as per-row columns `[B, Tp, 1]` (ids, `enter`, `leave`) and the ids once more as a row `[B, 1, Tp]`, so
the intra-block mask `ids_r == ids_c` needs no transpose; `keep` is `enter` at the block's leaving row (its last
row forward, its first in reverse; padded rows repeat the last real row's document).

The state is carried in fp32 (loop carry on Triton, VMEM scratch on TPU); it is rounded to the input dtype for
the `A S` product, as are the decay-weighted rows of B for the update (tensor core / MXU speed, like the rounding
of the scores before `(.) C`; bf16 outputs stay within ~1.3x the error of the fp32-state XLA path at T = 2000).
fp32 inputs use full-precision dots.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.core import segments
from jaxattn.kernels.common import cost, partition, platform
from jaxattn.kernels.common.loops import Reduction
from jaxattn.kernels.lightning_attention import blocks

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ScanStatic:
    """Static configuration of the scans of one call (hashable: a jit / custom_vjp static argument)."""
    length: int  # real rows T (the arrays are padded to whole blocks)
    sizes: blocks.BlockSizes
    target: str
    mode: str  # 'grid' (TPU) or 'fori' (Pallas-Triton); both run in the interpreter


def _dot(a, b, *, transpose_a=False, transpose_b=False):
    """fp32-accumulated `a @ b` (either operand transposed in place); full precision for fp32 operands."""
    dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def scan(a, b, c, slopes, init, docs, static: ScanStatic, *, reverse: bool, want_state: bool, out_dtype=None):
    """Returns `(o [B, N, Tp, Dc] in out_dtype (default c.dtype), state [B, N, Da, Dc] fp32 or None)`.
    `docs`: document ids `[B, Tp]` int32 (padded with the edge id) or None. Runs per shard of batch and heads
    (`partition.per_shard`)."""
    def local(*operands):
        return _scan(*operands, static, reverse=reverse, want_state=want_state, out_dtype=out_dtype)

    outs = partition.per_shard(local, (a, b, c, slopes, init, docs), SCAN_DIMS,
                               SCAN_OUT_DIMS[:1 + want_state])
    return outs[0], (outs[1] if want_state else None)


SCAN_DIMS = ("b n . .", "b n . .", "b n . .", "n", "b n . .", "b .")  # a, b, c, slopes, init, docs
SCAN_OUT_DIMS = ("b n . .", "b n . .")  # o, state


def _scan(a, b, c, slopes, init, docs, static: ScanStatic, *, reverse: bool, want_state: bool, out_dtype=None):
    """`scan` on one shard: a tuple `(o,)` or `(o, state)`."""
    batch, heads, tp, da = a.shape
    dc = c.shape[-1]
    block = static.sizes.block
    tile = blocks.value_tile(static.sizes, dc)
    nb = tp // block
    red = Reduction(static.mode, nb, axis=3)

    def step_index(i, n, e, s):
        return nb - 1 - s if reverse else s

    def rows(width, tiled):
        col = (lambda e: e) if tiled else (lambda e: 0)
        return red.reduced_spec(
            fori=((None, None, tp, width), lambda i, n, e: (i, n, 0, col(e))),
            grid=((None, None, block, width), lambda i, n, e, r: (i, n, r, col(e))),
            step_index=step_index)

    state_spec = red.spec((None, None, da, tile), lambda i, n, e: (i, n, 0, e))
    names, operands, in_specs = ["a", "b", "c"], [a, b, c], [rows(da, False), rows(da, False), rows(tile, True)]
    if slopes is not None:
        names.append("slopes"), operands.append(slopes.astype(F32).reshape(heads, 1, 1))
        in_specs.append(red.spec((None, 1, 1), lambda i, n, e: (n, 0, 0)))
    if init is not None:
        names.append("init"), operands.append(init.astype(F32)), in_specs.append(state_spec)
    if docs is not None:
        masks = segments.block_masks(docs, block, reverse=reverse)
        per_row = red.reduced_spec(fori=((None, tp, 1), lambda i, n, e: (i, 0, 0)),
                                   grid=((None, block, 1), lambda i, n, e, r: (i, r, 0)), step_index=step_index)
        per_col = red.reduced_spec(fori=((None, 1, tp), lambda i, n, e: (i, 0, 0)),
                                   grid=((None, 1, block), lambda i, n, e, r: (i, 0, r)), step_index=step_index)
        names += ["ids", "ids_row", "enter", "leave"]
        operands += [masks.ids[:, :, None], masks.ids[:, None, :], masks.enter[:, :, None], masks.leave[:, :, None]]
        in_specs += [per_row, per_col, per_row, per_row]
    out_shape = [jax.ShapeDtypeStruct(c.shape, out_dtype or c.dtype)]
    out_specs = [rows(tile, True)]
    names.append("out")
    if want_state:
        names.append("state")
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, da, dc), F32))
        out_specs.append(state_spec)
    kernel = functools.partial(_scan_kernel, names=tuple(names), length=static.length, block=block, num_blocks=nb,
                               reverse=reverse, red=red)
    warps, stages = blocks.TRITON_LAUNCH
    outs = pl.pallas_call(
        kernel,
        grid=red.grid((batch, heads, dc // tile)),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=red.scratch_shapes([jax.ShapeDtypeStruct((da, tile), F32)]),
        compiler_params=platform.compiler_params(static.target, dimension_semantics=red.semantics(("parallel",) * 3),
                                                 num_warps=warps, num_stages=stages),
        interpret=platform.interpret(static.target),
        name="lightning_scan_reverse" if reverse else "lightning_scan",
        cost_estimate=scan_cost(a, c, out_shape[0].dtype, static, decay=slopes is not None, init=init is not None,
                                want_state=want_state),
    )(*operands)
    return tuple(outs)


def scan_cost(a, c, out_dtype, static: ScanStatic, *, decay: bool, init: bool, want_state: bool) -> pl.CostEstimate:
    """What one scan computes: per program (batch, head, column tile of width `W`) and block of `L` rows, the whole
    `[L, L]` score tile `A B^T` and its product with C (masked after, not skipped), the inter-block term `A S`
    and the state update `B^T C`; with decay `lambda^dist` over the `[L, L]` tile (once per program in 'fori'
    mode, once per grid step in 'grid' mode, where the body runs per step) and `2 L + 1` powers per block. Bytes:
    A and B are read by every column tile's program, C and the output once, the fp32 state in/out when given."""
    batch, heads, tp, da = a.shape
    block, dc = static.sizes.block, c.shape[-1]
    width = blocks.value_tile(static.sizes, dc)
    programs, steps = batch * heads * (dc // width), tp // block
    per_step = (cost.matmul_flops(block, block, da) + cost.matmul_flops(block, width, block)
                + 2 * cost.matmul_flops(block, width, da))
    transcendentals = 0
    if decay:
        tiles = steps if static.mode == "grid" else 1
        transcendentals = programs * (tiles * block * block + steps * (2 * block + 1))
    state_bytes = da * width * cost.F32_BYTES * (int(init) + int(want_state))
    per_program = tp * (2 * da * a.dtype.itemsize + width * (c.dtype.itemsize + jnp.dtype(out_dtype).itemsize))
    return cost.estimate(flops=programs * steps * per_step, transcendentals=transcendentals,
                         bytes_accessed=programs * (per_program + state_bytes))


def _exponents(j, rows, *, length, block, reverse):
    """Decay exponents of block `j` (see the module docstring): `(e_r, w_c, n)` as `[L, 1]`, `[L, 1]`, scalar."""
    if reverse:
        n_end = jnp.minimum(block, length - 1 - j * block)  # L, or n_valid - 1 in the block of the last real row
        return n_end - rows, rows, n_end
    n_valid = jnp.minimum(block, length - j * block)
    return rows + 1, n_valid - 1 - rows, n_valid


def _times(weight, factor):
    """`weight * factor` where `weight` may be None (meaning 1)."""
    return factor if weight is None else weight * factor


def _scan_kernel(*refs, names, length, block, num_blocks, reverse, red):
    it = iter(refs)
    ref = {name: next(it) for name in names}
    scratch = list(it)
    decay = "slopes" in ref
    documents = "ids" in ref
    slope = ref["slopes"][...] if decay else None  # [1, 1]

    def power(exponent):
        """`lambda^max(exponent, 0)` in fp32 for int exponents (any shape broadcasting with `[1, 1]`)."""
        return jnp.exp(-slope * jnp.maximum(exponent, 0).astype(F32))

    rows = lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    dist = lax.broadcasted_iota(jnp.int32, (block, block), 0) - lax.broadcasted_iota(jnp.int32, (block, block), 1)
    dist = -dist if reverse else dist  # >= 0 where the pair interacts
    intra = power(dist) if decay else None

    def step(i, carry):
        j = num_blocks - 1 - i if reverse else i
        sl = (pl.ds(pl.multiple_of(j * block, block), block), slice(None))
        a, b, c = (red.tile(ref[name], sl) for name in ("a", "b", "c"))
        state = carry[0]
        scores = _dot(a, b, transpose_b=True)
        interacts = dist >= 0
        row_in = col_out = keep = None  # weights of the incoming state per row, of the keys leaving, of the state
        if documents:
            ids, enter, leave = (red.tile(ref[name], sl) for name in ("ids", "enter", "leave"))
            ids_row = red.tile(ref["ids_row"], (slice(None), sl[0]))
            interacts = interacts & (ids == ids_row)
            row_in, col_out = enter, leave
            leaving_row = (0 if reverse else block - 1) + (0 if red.on_grid else j * block)
            keep = ref["enter"][pl.ds(leaving_row, 1), :]  # [1, 1] (a value slice does not lower on Triton)
        if decay:
            e_row, w_col, whole = _exponents(j, rows, length=length, block=block, reverse=reverse)
            row_in, col_out = _times(row_in, power(e_row)), _times(col_out, power(w_col))
            keep = _times(keep, power(whole))
        scores = jnp.where(interacts, scores * intra if decay else scores, 0.0)
        out = _dot(scores.astype(c.dtype), c)
        inter = _dot(a, state.astype(a.dtype))
        if row_in is not None:
            inter = inter * row_in
            b = (b.astype(F32) * col_out).astype(b.dtype)
            state = state * keep
        red.store(ref["out"], sl, out + inter)
        return [state + _dot(b, c, transpose_a=True)]

    def init():
        if "init" in ref:
            return [ref["init"][...].astype(F32)]
        return [jnp.zeros((ref["a"].shape[-1], ref["out"].shape[-1]), F32)]

    def finish(carry):
        if "state" in ref:
            ref["state"][...] = carry[0]

    red.run(init, step, finish, start=0, count=num_blocks, scratch=scratch)
