"""Flash attention as Pallas kernels for TPU (Mosaic) and GPU (the Pallas-Triton lowering), with a fused backward.

`flash_attention` takes the op's heads-last arrays, converts them to the kernels' layout (heads-major, padded to
whole blocks; the conversion is plain XLA and differentiates itself), and calls the forward / backward kernels
through a `custom_vjp`:

- forward (`pallas_fwd`): out and the fp32 log-sum-exp, one query block per program;
- backward (`pallas_bwd`): dk/dv per key block (GQA groups accumulated in place), dq per query block, and dbias
  (the dlogits of each visited tile) only when the bias is actually differentiated (`symbolic_zeros`).

Blocks outside the causal / local-window band are never visited; per-head windows, `kv_lengths` and block masks
walk tables of the visited blocks (`walk.py`). Not supported: a general boolean `mask`
(the op falls back to its XLA path), and Mosaic GPU: the shared kernel body is written with `jnp.dot` on
register values, which Mosaic GPU's warpgroup lowering does not accept (it needs `wgmma`-specific code); GPUs
run the Pallas-Triton lowering here, or the real Triton kernel (`triton.py`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn.core import blocking, softmax
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import partition, platform
from jaxattn.kernels.flash_attention import blocks, cost, pallas_bwd, pallas_fwd, vjp, walk
from jaxattn.kernels.flash_attention.blocks import BlockSizes
from jaxattn.kernels.flash_attention.tile import Problem
from jaxattn.kernels.flash_attention.vjp import flash_vjp


@dataclasses.dataclass(frozen=True)
class _Static:
    problem: Problem
    sizes: BlockSizes
    target: str
    mode: str  # reduction walk: 'grid' (TPU) or 'fori' (Triton); both run in the interpreter


@platform.lowering_target
def flash_attention(query, key, value, bias=None, *, q_segment_ids=None, k_segment_ids=None, scale=None,
                    is_causal=False, window=None, causal_offset=None, sinks=None, logits_soft_cap=None,
                    kv_lengths=None, block_mask=None, block_shape=None, target=None,
                    block_sizes: BlockSizes | None = None, reduction: str | None = None):
    """Softmax attention with the flash-attention kernels. Returns `(out [B, T, N, Hv], lse [B, N, T] fp32)`.

    Args:
      query `[B, T, N, H]`, key `[B, S, K, H]`, value `[B, S, K, Hv]` with `N % K == 0` (GQA, never repeated).
      bias: additive logits broadcastable to `[B, N, T, S]` (batch/head broadcasts are not materialised; a
        broadcast along T or S is). Its gradient costs one `[B, N, T, S]` fp32 buffer in the backward.
      q_segment_ids `[B, T]`, k_segment_ids `[B, S]`: integer ids; a query sees keys of its own segment.
      scale: logit scale (default `H ** -0.5`).
      is_causal / window `(left, right)` / causal_offset: key `j` is visible to query `i` iff
        `j - (i + causal_offset)` is `<= 0` (causal) and in `[-left, right]` (window); the offset defaults to
        `S - T` (bottom-right alignment). `window` may also be a sequence of one `(left, right)` pair (or None:
        global) per query head.
      sinks: `[N]` logits, one per query head, added to the softmax denominator (a key without value); `lse`
        includes them, and they are differentiated.
      logits_soft_cap: `cap > 0`: logits `s <- cap * tanh(s / cap)` after scaling, before bias and masks.
      kv_lengths: int `[B]`: keys `j >= kv_lengths[b]` are masked and the diagonal moves by `kv_lengths[b] - S`
        (queries are the last `T` positions of each row's `kv_lengths[b]` keys); blocks past it are skipped.
      block_mask, block_shape: bool `[B|1, N|1, ceil(T/bq), ceil(S/bk)]` and `(bq, bk)`: query `i` sees key `j`
        only if `block_mask[b, n, i // bq, j // bk]`; False blocks are skipped (on TPU never fetched). The
        kernel's tiles are fitted inside the mask's blocks.
      target: 'tpu', 'triton', 'interpret' or 'tpu_interpret' (default: the platform the program is lowered for,
        'interpret' on CPU); see `kernels/common/platform.py`.
      block_sizes: tile sizes (default per target, see `blocks.py`); fitted to short lengths.
      reduction: 'grid' or 'fori' (default 'grid' on TPU, where it is the only choice, 'fori' elsewhere; see
        `kernels/common/loops.py`). Triton needs 'fori'.

    A query that sees no key gets output 0 and lse `-inf`.
    """
    vjp.check_segment_ids(q_segment_ids, k_segment_ids)
    vjp.check_features(query, key, sinks=sinks, kv_lengths=kv_lengths, block_mask=block_mask,
                       block_shape=block_shape)
    static = _static(query.shape[1], key.shape[1], query.shape[3], query.shape[2], scale=scale,
                     is_causal=is_causal, window=window, causal_offset=causal_offset,
                     logits_soft_cap=logits_soft_cap, kv_lengths=kv_lengths,
                     block_shape=None if block_mask is None else block_shape, target=target,
                     block_sizes=block_sizes, reduction=reduction)
    return _flash_attention(query, key, value, bias, q_segment_ids, k_segment_ids, sinks,
                            _dynamic(kv_lengths, block_mask), static)


attention = vjp.dot_product_backend(flash_attention, "Pallas")


def _dynamic(kv_lengths, block_mask):
    return None if kv_lengths is None and block_mask is None else (kv_lengths, block_mask)


def _static(t, s, h, n, *, scale, is_causal, window, causal_offset, logits_soft_cap=None, kv_lengths=None,
            block_shape=None, target, block_sizes, reduction) -> _Static:
    target = platform.resolve_target(target)
    mode = reduction or ("grid" if platform.tpu_like(target) else "fori")
    if target == "tpu" and mode != "grid":
        raise ValueError("target='tpu' walks key blocks on the grid (reduction='grid'); 'fori' would keep whole "
                         "key/value sequences in VMEM")
    problem = Problem.of(t, s, h, scale=scale, is_causal=is_causal, window=window, causal_offset=causal_offset,
                         logits_soft_cap=logits_soft_cap, kv_lengths=kv_lengths is not None, block_shape=block_shape,
                         num_heads=n)
    sizes = block_sizes
    if block_shape is not None:
        default = blocks.tpu_plan(head_dim=h) if target == "tpu" else blocks.DEFAULTS.get(target,
                                                                                           blocks.DEFAULTS["interpret"])
        sizes = walk.fit_to_block_shape(block_sizes or default, block_shape)
    sizes = blocks.fit(target, t, s, sizes, head_dim=h)
    if block_shape is not None:
        for bq, bk in zip(sizes.q_blocks, sizes.k_blocks):
            walk.check_block_shape(block_shape, t, s, bq, bk, target)
    return _Static(problem, sizes, target, mode)


def _kernel_inputs(query, key, value, bias, q_segment_ids, k_segment_ids, static: _Static):
    """The op's heads-last arrays in the kernels' layout: `(q, k, v, bias, q_seg, k_seg)`, padded to whole blocks."""
    t, h, s, hv = query.shape[1], query.shape[3], key.shape[1], value.shape[-1]
    tp, sp = blocks.padded_lengths(static.sizes, t, s)
    hp = common_blocks.feature_dim(h, static.target)
    hvp = common_blocks.feature_dim(hv, static.target)
    q, k, v = _kernel_layout(query, tp, hp), _kernel_layout(key, sp, hp), _kernel_layout(value, sp, hvp)
    bias_k = None
    if bias is not None:
        b4 = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        b4 = jnp.broadcast_to(b4, (*b4.shape[:2], t, s))
        bias_k = blocking.pad_axis(blocking.pad_axis(b4, 2, tp), 3, sp)
    q_seg = k_seg = None
    if q_segment_ids is not None:
        q_seg = blocking.pad_axis(q_segment_ids.astype(jnp.int32), 1, tp, -1)[:, :, None]
        k_seg = blocking.pad_axis(k_segment_ids.astype(jnp.int32), 1, sp, -1)[:, None, :]
    return q, k, v, bias_k, q_seg, k_seg


def _heads_last(x, length, dim):
    """Kernel layout `[B, heads, Lp, Dp]` -> the op's `[B, L, heads, D]`."""
    return jnp.swapaxes(x, 1, 2)[:, :length, :, :dim]


def _kernel_sinks(sinks, num_heads: int, q_len_p: int):
    """`[N]` sink logits -> `[1, N, Tp, 1]` fp32, the rows' layout (its broadcast differentiates itself)."""
    return None if sinks is None else jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None],
                                                       (1, num_heads, q_len_p, 1))


@functools.partial(jax.jit, static_argnums=(8,))
def _flash_attention(query, key, value, bias, q_segment_ids, k_segment_ids, sinks, dynamic, static: _Static):
    t, hv = query.shape[1], value.shape[-1]
    q, k, v, bias_k, q_seg, k_seg = _kernel_inputs(query, key, value, bias, q_segment_ids, k_segment_ids, static)
    out, lse = _flash(q, k, v, bias_k, q_seg, k_seg, _kernel_sinks(sinks, q.shape[1], q.shape[2]), dynamic, static)
    return _heads_last(out, t, hv), lse[:, :, :t, 0]


@platform.lowering_target
def flash_attention_backward(query, key, value, out, lse, d_out, bias=None, *, d_lse=None, delta=None,
                             q_segment_ids=None, k_segment_ids=None, scale=None, is_causal=False, window=None,
                             causal_offset=None, logits_soft_cap=None, kv_lengths=None, block_mask=None,
                             block_shape=None, want_dbias=None, target=None, block_sizes: BlockSizes | None = None,
                             reduction: str | None = None):
    """The backward kernels alone, from a saved `out [B, T, N, Hv]` and `lse [B, N, T]` (no forward kernel runs).

    `p = exp(s - lse)` is recomputed per tile from the given `lse` and `delta = rowsum(d_out * out) - d_lse` from
    the given `out` (`softmax.backward_delta`), or `delta` is the given fp32 `[B, N, T]` and then `out` and
    `d_lse` are not used (pass `out=None`). So with the global `out`/`lse` of a softmax merged over key blocks
    (ring attention) each block gets its exact share of the gradient (with sinks, `lse` includes them; their gradient is
    `softmax.sink_gradient`). Returns `(dq, dk, dv, dlogits)`; `dlogits` (`[B, N, T, S]` fp32, the bias's broadcast
    axes not yet summed) only when `want_dbias` (default: a bias is given).
    """
    vjp.check_segment_ids(q_segment_ids, k_segment_ids)
    vjp.check_features(query, key, sinks=None, kv_lengths=kv_lengths, block_mask=block_mask, block_shape=block_shape)
    if delta is not None and d_lse is not None:
        raise ValueError("give `d_lse` or a precomputed `delta`, not both (`delta` already contains `-d_lse`)")
    t, h, s, hv = query.shape[1], query.shape[3], key.shape[1], value.shape[-1]
    static = _static(t, s, h, query.shape[2], scale=scale, is_causal=is_causal, window=window,
                     causal_offset=causal_offset,
                     logits_soft_cap=logits_soft_cap, kv_lengths=kv_lengths,
                     block_shape=None if block_mask is None else block_shape, target=target,
                     block_sizes=block_sizes, reduction=reduction)
    want_dbias = bias is not None if want_dbias is None else want_dbias
    q, k, v, bias_k, q_seg, k_seg = _kernel_inputs(query, key, value, bias, q_segment_ids, k_segment_ids, static)
    tp = q.shape[2]
    do = _kernel_layout(d_out.astype(query.dtype), tp, v.shape[3])
    def rows(x):  # [B, N, T] -> [B, N, Tp, 1] fp32
        return None if x is None else blocking.pad_axis(x.astype(jnp.float32), 2, tp)[..., None]
    o = None if delta is not None else _kernel_layout(out, tp, v.shape[3])
    dq, dk, dv, dlogits, _ = _backward(static, q, k, v, bias_k, q_seg, k_seg, None, _dynamic(kv_lengths, block_mask),
                                       o, rows(lse), do, rows(d_lse), want_dbias, delta=rows(delta))
    dlogits = None if dlogits is None else dlogits[:, :, :t, :s]
    return _heads_last(dq, t, h), _heads_last(dk, s, h), _heads_last(dv, s, hv), dlogits


def _kernel_layout(x, length, dim):
    """`[B, L, heads, D]` -> `[B, heads, Lp, Dp]`, zero padded (exact: padded keys are masked, padded features
    add zero to every dot product, padded query rows are dropped)."""
    x = jnp.swapaxes(x, 1, 2)
    return blocking.pad_axis(blocking.pad_axis(x, 2, length), 3, dim)


def _walk_table(static: _Static, dynamic, q, k, block_q: int, block_k: int, *, key_major: bool = False):
    """The walk table of a kernel with these tiles (None when the band alone says which blocks are visited)."""
    if not static.problem.dynamic:
        return None
    kv_lengths, block_mask = dynamic if dynamic is not None else (None, None)
    return walk.build(static.problem, batch=q.shape[0], heads=q.shape[1], kv_lengths=kv_lengths,
                      block_mask=block_mask, block_q=block_q, block_k=block_k, num_q=q.shape[2] // block_q,
                      num_k=k.shape[2] // block_k, key_major=key_major)


# Roles of the kernels' operands for `partition.per_shard`: batch 'b', query heads 'n', key/value heads 'k'.
ROWS = "b n . ."  # q, out, lse, d_out, delta, bias (its broadcast batch/heads stay whole), dlogits
KV = "b k . ."  # k, v, dk, dv
INPUT_DIMS = (ROWS, KV, KV, ROWS, "b . .", "b . .")  # q, k, v, bias, q_seg, k_seg
SINKS, DYNAMIC = ". n . .", ("b", "b n . .")  # sinks [1, N, Tp, 1]; kv_lengths [B], block_mask [B|1, N|1, ...]


def _splits_heads(static: _Static) -> bool:
    """Per-head windows are static data of every head: such kernels run with whole heads."""
    return static.problem.head_windows is None


def _forward(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static: _Static):
    return partition.per_shard(functools.partial(_forward_shard, static=static),
                               (q, k, v, bias, q_seg, k_seg, sinks, dynamic), (*INPUT_DIMS, SINKS, DYNAMIC),
                               (ROWS, ROWS), heads=_splits_heads(static))


def _forward_shard(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static: _Static):
    sizes = static.sizes
    estimate = cost.kernel_cost("fwd", static.problem, q, k, v, bias, q_seg, block_q=sizes.block_q,
                                block_k=sizes.block_k)
    return pallas_fwd.forward(q, k, v, bias, q_seg, k_seg, sinks,
                              _walk_table(static, dynamic, q, k, sizes.block_q, sizes.block_k),
                              problem=static.problem, block_q=sizes.block_q, block_k=sizes.block_k,
                              target=static.target, mode=static.mode, cost_estimate=estimate)


def _backward(static: _Static, q, k, v, bias, q_seg, k_seg, sinks, dynamic, out, lse, d_out, d_lse, want_dbias,
              delta=None):
    """`flash_vjp`'s backward (kernel layout, rows `[B, N, Tp, 1]`); a given `delta` replaces `out`/`d_lse`."""
    if delta is None:
        delta = softmax.backward_delta(out, d_out, d_lse, keepdims=True)
    lse = softmax.finite_or_zero(lse)
    args = (q, k, v, bias, q_seg, k_seg, d_out, lse, delta, dynamic)
    dims = (*INPUT_DIMS, ROWS, ROWS, ROWS, DYNAMIC)
    heads = _splits_heads(static)
    dq_out = partition.per_shard(functools.partial(_dq_shard, static=static, want_dbias=want_dbias), args, dims,
                                 (ROWS, ROWS) if want_dbias else (ROWS,), heads=heads)
    dq, dlogits = dq_out[0], (dq_out[1] if want_dbias else None)
    dk, dv = partition.per_shard(functools.partial(_dkv_shard, static=static), args, dims, (KV, KV), heads=heads)
    dsinks = None if sinks is None else softmax.sink_gradient(sinks, lse, delta, 0)[None]
    return dq, dk, dv, dlogits, dsinks


def _dq_shard(q, k, v, bias, q_seg, k_seg, d_out, lse, delta, dynamic, *, static: _Static, want_dbias: bool):
    sizes = static.sizes
    estimate = cost.kernel_cost("dq", static.problem, q, k, v, bias, q_seg, block_q=sizes.block_q_dq,
                                block_k=sizes.block_k_dq, dlogits=want_dbias)
    dq, dlogits = pallas_bwd.dq(q, k, v, bias, q_seg, k_seg, d_out, lse, delta,
                                _walk_table(static, dynamic, q, k, sizes.block_q_dq, sizes.block_k_dq),
                                want_dbias=want_dbias, block_q=sizes.block_q_dq, block_k=sizes.block_k_dq,
                                cost_estimate=estimate, problem=static.problem, target=static.target,
                                mode=static.mode)
    return (dq, dlogits) if want_dbias else (dq,)


def _dkv_shard(q, k, v, bias, q_seg, k_seg, d_out, lse, delta, dynamic, *, static: _Static):
    sizes = static.sizes
    estimate = cost.kernel_cost("dkv", static.problem, q, k, v, bias, q_seg, block_q=sizes.block_q_dkv,
                                block_k=sizes.block_k_dkv)
    table = _walk_table(static, dynamic, q, k, sizes.block_q_dkv, sizes.block_k_dkv, key_major=True)
    return pallas_bwd.dkv(q, k, v, bias, q_seg, k_seg, d_out, lse, delta, table, block_q=sizes.block_q_dkv,
                          block_k=sizes.block_k_dkv, cost_estimate=estimate, problem=static.problem,
                          target=static.target, mode=static.mode)


_flash = flash_vjp(_forward, _backward)
