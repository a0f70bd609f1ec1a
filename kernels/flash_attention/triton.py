"""Flash attention as real Triton kernels (`triton_kernels.py`), launched from JAX through `jax_triton`.

The GPU path that does not depend on Pallas-Triton (deprecated in JAX 0.11). It works on the op's heads-last
arrays in place (strides, no transposes or padding), GQA by index, a bias broadcast by zero strides (never
materialised), and shares the custom VJP (`vjp.py`) and launch plans (`triton_launch.py`) with the tests.
`jax_triton` is imported when a kernel is traced, so importing this module is free on machines without a GPU.
Sinks, the soft cap, per-head windows, `kv_lengths` and block masks as in `pallas.py` (the walk tables of
`walk.py`, built per kernel for its tiles). Not supported: a boolean `mask` (the op falls back to XLA).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn.core import softmax
from jaxattn.kernels.common import partition
from jaxattn.kernels.flash_attention import triton_launch, vjp, walk
from jaxattn.kernels.flash_attention.tile import Problem
from jaxattn.kernels.flash_attention.vjp import flash_vjp


@dataclasses.dataclass(frozen=True)
class _Static:
    problem: Problem
    blocks: tuple | None = None  # per-kernel (block_m, block_n, warps, stages) overrides, as triton_launch.BLOCKS


def flash_attention(query, key, value, bias=None, *, q_segment_ids=None, k_segment_ids=None, scale=None,
                    is_causal=False, window=None, causal_offset=None, sinks=None, logits_soft_cap=None,
                    kv_lengths=None, block_mask=None, block_shape=None, blocks: dict | None = None):
    """Same arguments and results as `pallas.flash_attention` (without target/block_sizes/reduction);
    `blocks` optionally overrides `triton_launch.BLOCKS` per kernel name. Returns `(out, lse)`."""
    vjp.check_features(query, key, sinks=sinks, kv_lengths=kv_lengths, block_mask=block_mask,
                       block_shape=block_shape)
    static, bias, q_seg, k_seg = _prepare(query, key, bias, q_segment_ids, k_segment_ids, scale, is_causal, window,
                                          causal_offset, blocks, logits_soft_cap, kv_lengths, block_mask, block_shape)
    return _attention(query, key, value, bias, q_seg, k_seg, sinks, _dynamic(kv_lengths, block_mask), static)


def flash_attention_backward(query, key, value, out, lse, d_out, bias=None, *, d_lse=None, delta=None,
                             q_segment_ids=None, k_segment_ids=None, scale=None, is_causal=False, window=None,
                             causal_offset=None, logits_soft_cap=None, kv_lengths=None, block_mask=None,
                             block_shape=None, want_dbias=None, blocks: dict | None = None):
    """The backward kernels alone, from a saved `out` and `lse` (see `pallas.flash_attention_backward`); works on
    the heads-last arrays in place; a given fp32 `delta [B, N, T]` replaces `out` and `d_lse` as there. Returns
    `(dq, dk, dv, dlogits or None)`."""
    vjp.check_features(query, key, sinks=None, kv_lengths=kv_lengths, block_mask=block_mask, block_shape=block_shape)
    if delta is not None and d_lse is not None:
        raise ValueError("give `d_lse` or a precomputed `delta`, not both (`delta` already contains `-d_lse`)")
    static, bias4, q_seg, k_seg = _prepare(query, key, bias, q_segment_ids, k_segment_ids, scale, is_causal, window,
                                           causal_offset, blocks, logits_soft_cap, kv_lengths, block_mask,
                                           block_shape)
    want_dbias = bias is not None if want_dbias is None else want_dbias
    return _backward(static, query, key, value, bias4, q_seg, k_seg, None, _dynamic(kv_lengths, block_mask), out,
                     lse.astype(jnp.float32), d_out.astype(query.dtype), d_lse, want_dbias,
                     delta=None if delta is None else delta.astype(jnp.float32))[:4]


def _dynamic(kv_lengths, block_mask):
    return None if kv_lengths is None and block_mask is None else (kv_lengths, block_mask)


def _prepare(query, key, bias, q_segment_ids, k_segment_ids, scale, is_causal, window, causal_offset, blocks,
             logits_soft_cap=None, kv_lengths=None, block_mask=None, block_shape=None):
    vjp.check_segment_ids(q_segment_ids, k_segment_ids)
    problem = Problem.of(query.shape[1], key.shape[1], query.shape[3], scale=scale, is_causal=is_causal,
                         window=window, causal_offset=causal_offset, logits_soft_cap=logits_soft_cap,
                         kv_lengths=kv_lengths is not None, block_shape=None if block_mask is None else block_shape,
                         num_heads=query.shape[2])
    static = _Static(problem, None if blocks is None else tuple(sorted(blocks.items())))
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    q_seg = None if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    k_seg = None if k_segment_ids is None else k_segment_ids.astype(jnp.int32)
    return static, bias, q_seg, k_seg


attention = vjp.dot_product_backend(flash_attention, "Triton")


def _triton_call():
    import jax_triton  # lazily: it raises ImportError on a CPU-only jax
    return jax_triton.triton_call


def _plan(kernel, static: _Static, q, k, v, bias, q_seg, sinks, dynamic, **extra):
    overrides = dict(static.blocks or ())
    block_mask = None if dynamic is None else dynamic[1]
    return triton_launch.plan(kernel, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape,
                              bias_shape=None if bias is None else bias.shape, segments=q_seg is not None,
                              band=static.problem.band, scale=static.problem.scale,
                              fp32=q.dtype == jnp.float32, blocks=overrides.get(kernel), problem=static.problem,
                              sinks=sinks is not None,
                              block_mask_shape=None if block_mask is None else block_mask.shape, **extra)


def _walk_table(launch: triton_launch.Launch, static: _Static, q, k, dynamic):
    """The walk table of `launch`'s tiles (a dummy when the band alone says which blocks are visited)."""
    if launch.walk is None:
        return jnp.zeros((1,), jnp.int32)
    kv_lengths, block_mask = dynamic if dynamic is not None else (None, None)
    bm, bn = launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"]
    built, table = walk.build(static.problem, batch=q.shape[0], heads=q.shape[2], kv_lengths=kv_lengths,
                              block_mask=block_mask, block_q=bm, block_k=bn, num_q=-(-q.shape[1] // bm),
                              num_k=-(-k.shape[1] // bn), key_major=launch.kernel == "flash_bwd_dkv")
    assert built == launch.walk, (built, launch.walk)
    return table


def _launch(launch: triton_launch.Launch, inputs, out_shape, **kwargs):
    from jaxattn.kernels.flash_attention import triton_kernels
    return _triton_call()(*inputs, kernel=getattr(triton_kernels, launch.kernel), out_shape=out_shape,
                          grid=launch.grid, num_warps=launch.num_warps, num_stages=launch.num_stages,
                          name=launch.kernel, **kwargs, **launch.constexprs)


def _operands(q, k, v, bias, q_seg, k_seg, sinks, table):
    dummy = jnp.zeros((1,), q.dtype)
    no_seg = jnp.zeros((1,), jnp.int32)
    return (q, k, v, dummy if bias is None else bias, no_seg if q_seg is None else q_seg,
            no_seg if k_seg is None else k_seg,
            jnp.zeros((1,), jnp.float32) if sinks is None else sinks.astype(jnp.float32), table)


# `partition.per_shard` roles of the heads-last arrays: batch 'b', query heads 'n', key/value heads 'k'.
ROWS, KV, PER_ROW = "b . n .", "b . k .", "b n ."  # [B, T, N, .], [B, S, K, .], [B, N, T] (lse, delta)
# q, k, v, bias [Bb, Nb, T, S], q_seg [B, T], k_seg [B, S], sinks [N], (kv_lengths [B], block_mask [B|1, N|1, ..])
INPUT_DIMS = (ROWS, KV, KV, "b n . .", "b .", "b .", "n", ("b", "b n . ."))


def _per_shard(kernel, static: _Static, operands, dims, out_dims):
    """`kernel(*operands, static=)` per shard of batch and heads (whole heads with per-head windows)."""
    return partition.per_shard(functools.partial(kernel, static=static), operands, dims, out_dims,
                               heads=static.problem.head_windows is None)


def _forward(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static: _Static):
    return _per_shard(_forward_shard, static, (q, k, v, bias, q_seg, k_seg, sinks, dynamic), INPUT_DIMS,
                      (ROWS, PER_ROW))


def _forward_shard(q, k, v, bias, q_seg, k_seg, sinks, dynamic, *, static: _Static):
    b, t, n, _ = q.shape
    launch = _plan("flash_fwd", static, q, k, v, bias, q_seg, sinks, dynamic)
    out_shape = [jax.ShapeDtypeStruct((b, t, n, v.shape[-1]), q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)]
    operands = _operands(q, k, v, bias, q_seg, k_seg, sinks, _walk_table(launch, static, q, k, dynamic))
    return tuple(_launch(launch, operands, out_shape))


def _backward(static: _Static, q, k, v, bias, q_seg, k_seg, sinks, dynamic, out, lse, d_out, d_lse, want_dbias,
              delta=None):
    """`flash_vjp`'s backward (heads-last, rows `[B, N, T]`); a given `delta` replaces `out`/`d_lse`."""
    if delta is None:
        delta = softmax.backward_delta_heads_last(out, d_out, d_lse)
    lse = softmax.finite_or_zero(lse)
    args = (q, k, v, bias, q_seg, k_seg, sinks, dynamic, d_out, lse, delta)
    dims = (*INPUT_DIMS, ROWS, PER_ROW, PER_ROW)
    dk, dv = _per_shard(_dkv_shard, static, args, dims, (KV, KV))
    dq, ds = _per_shard(functools.partial(_dq_shard, want_dbias=want_dbias), static, args, dims,
                        (ROWS, "b n . ." if want_dbias else "."))
    dsinks = None if sinks is None else softmax.sink_gradient(sinks[None, :, None], lse, delta, (0, 2))
    return dq, dk, dv, (ds if want_dbias else None), dsinks


def _shard_inputs(launch, static: _Static, q, k, v, bias, q_seg, k_seg, sinks, dynamic, d_out, lse, delta):
    return (*_operands(q, k, v, bias, q_seg, k_seg, sinks, _walk_table(launch, static, q, k, dynamic)), d_out, lse,
            delta)


def _dkv_shard(q, k, v, bias, q_seg, k_seg, sinks, dynamic, d_out, lse, delta, *, static: _Static):
    launch = _plan("flash_bwd_dkv", static, q, k, v, bias, q_seg, sinks, dynamic)
    inputs = _shard_inputs(launch, static, q, k, v, bias, q_seg, k_seg, sinks, dynamic, d_out, lse, delta)
    return tuple(_launch(launch, inputs, [jax.ShapeDtypeStruct(k.shape, k.dtype),
                                          jax.ShapeDtypeStruct(v.shape, v.dtype)]))


def _dq_shard(q, k, v, bias, q_seg, k_seg, sinks, dynamic, d_out, lse, delta, *, static: _Static, want_dbias):
    b, t, n, _ = q.shape
    launch = _plan("flash_bwd_dq", static, q, k, v, bias, q_seg, sinks, dynamic, store_ds=want_dbias)
    inputs = _shard_inputs(launch, static, q, k, v, bias, q_seg, k_seg, sinks, dynamic, d_out, lse, delta)
    ds_shape = (b, n, t, k.shape[1]) if want_dbias else (1,)
    return tuple(_launch(launch, inputs, [jax.ShapeDtypeStruct(q.shape, q.dtype),
                                          jax.ShapeDtypeStruct(ds_shape, jnp.float32)],
                         zeroed_outputs=(1,) if want_dbias else ()))


_attention = jax.jit(flash_vjp(_forward, _backward), static_argnums=(8,))
