"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence-sharded to head-sharded and back.

Each device trades its `[B, T/n, N, H]` shard for `[B, T, N/n, H]` (the whole sequence, `1/n` of the heads), runs
the single-device op on it, with every feature of the op (causal, local windows) and no load imbalance, and trades
back. Four all-to-alls per layer (q, k, v, out; the VJP is the same in reverse). The parallel degree is bounded by
the head count: `N` must be divisible by the axis size `n`. With GQA, K/V heads are split the same way when
`K % n == 0`; when `n % K == 0` (fewer K/V heads than devices) each K/V head is repeated `n / K` times first, so
that every device receives the one K/V head its query heads use (this costs `n / K` times the K/V traffic; the
repeat's VJP sums the copies). Any other head count raises `ValueError`. Segment ids (packed sequences) are
all-gathered over the axis (the whole sequence's ids on every device, int32 `[B, T]`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.context_parallel import common, zigzag
from jaxattn.dot_product.api import dot_product_attention


def kv_repeats(num_heads: int, num_kv_heads: int, n: int) -> int:
    """How often each K/V head is repeated before the all-to-all; `ValueError` when the heads do not split."""
    if num_heads % n:
        raise ValueError(f"Ulysses splits heads over the context axis: `query` heads ({num_heads}) must be divisible "
                         f"by the axis size ({n})")
    if num_kv_heads % n == 0:
        return 1
    if n % num_kv_heads == 0:
        return n // num_kv_heads
    raise ValueError(f"Ulysses needs `key`/`value` heads ({num_kv_heads}) divisible by the axis size ({n}), or the "
                     f"axis size divisible by them (then they are repeated)")


def ulysses_attention_local(query, key, value, *, axis_name: str = "context", zigzag_layout: bool = False,
                            query_segment_ids=None, key_segment_ids=None, sinks=None, **op_kwargs):
    """Per-device body (call inside `shard_map`, `check_vma` on or off): local `[B, T/n, N, H]` / `[B, T/n, K, H]`
    shards in, local `[B, T/n, N, Hv]` out; local segment ids `[B, T/n]` optional (both or neither). `op_kwargs`
    go to `dot_product_attention` (is_causal, scale, local_window_size, logits_soft_cap, ...); `sinks [N]` (all
    heads) are cut to this device's heads.

    zigzag_layout: the shards are in zigzag order; the gathered sequence is put back in natural order for the op.
    """
    n = jax.lax.axis_size(axis_name)
    reps = kv_repeats(query.shape[2], key.shape[2], n)
    if reps > 1:
        key, value = jnp.repeat(key, reps, axis=2), jnp.repeat(value, reps, axis=2)

    def to_heads(x):  # [B, T/n, heads, D] -> [B, T, heads/n, D]
        x = jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
        return zigzag.zigzag_unpermute(x, n) if zigzag_layout else x

    def to_sequence(x):  # inverse of to_heads
        x = zigzag.zigzag_permute(x, n) if zigzag_layout else x
        return jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)

    def gather_ids(ids):  # [B, T/n] -> the whole sequence's [B, T]
        if ids is None:
            return None
        ids = jax.lax.all_gather(ids, axis_name, axis=1, tiled=True)
        return zigzag.zigzag_unpermute(ids, n) if zigzag_layout else ids

    if sinks is not None:  # the all-to-all hands device r the r-th contiguous block of heads
        per_device = query.shape[2] // n
        sinks = jax.lax.dynamic_slice_in_dim(sinks, jax.lax.axis_index(axis_name) * per_device, per_device)
    out = dot_product_attention(to_heads(query), to_heads(key), to_heads(value), sinks=sinks,
                                query_segment_ids=gather_ids(query_segment_ids),
                                key_segment_ids=gather_ids(key_segment_ids), **op_kwargs)
    return to_sequence(out)


def ulysses_attention(query, key, value, *, axis_name: str = "context", mesh=None, batch_axes=None,
                      is_causal: bool = False, local_window_size=None, zigzag_order: bool = False,
                      scale: float | None = None, query_segment_ids=None, key_segment_ids=None, sinks=None,
                      logits_soft_cap=None, implementation=None):
    """Softmax attention with the sequence sharded over `axis_name`, computed head-sharded; equals
    `dot_product_attention`.

    Args:
      query: global `[B, T, N, H]`; key, value: `[B, T, K, H]`, `[B, T, K, Hv]`. `N` must be divisible by the
        axis size `n`; `K` divisible by `n`, or dividing it (K/V heads are then repeated, see the module doc).
      axis_name, mesh, batch_axes: as `ring_attention`.
      is_causal, local_window_size, scale, query_segment_ids, key_segment_ids, sinks, logits_soft_cap,
        implementation: as `dot_product_attention` (global positions; segment ids `[B, T]`, sharded like the
        sequence; `sinks [N]` replicated, each device uses its heads').
      zigzag_order: the arrays are in zigzag order (`zigzag_permute`), as used by the load-balanced ring; the
        output keeps that order. Ulysses itself needs no load balancing.

    Returns:
      `[B, T, N, Hv]` in the query dtype, sharded like `query`. Lengths not divisible by the axis size (twice it
      with `zigzag_order`) raise `ValueError`. Inside a `shard_map` manual over `axis_name` the arrays are
      shards and the per-device body runs on them.
    """
    mesh = common.resolve_mesh(mesh)
    common.check_qkv(query, key, value)
    common.check_segment_ids(query, query_segment_ids, key_segment_ids)
    common.check_sinks(query, sinks)
    n = common.axis_size(mesh, axis_name)
    kv_repeats(query.shape[2], key.shape[2], n)
    ids = {} if query_segment_ids is None else {"query_segment_ids": query_segment_ids,
                                                 "key_segment_ids": key_segment_ids}
    common.check_sequence_inputs(mesh, axis_name, batch_axes, 2 if zigzag_order else 1,
                                 query=query, key=key, value=value, **ids)

    def body(q, k, v, q_ids, k_ids, sinks):
        return ulysses_attention_local(q, k, v, axis_name=axis_name, zigzag_layout=zigzag_order,
                                       query_segment_ids=q_ids, key_segment_ids=k_ids, sinks=sinks,
                                       is_causal=is_causal, local_window_size=local_window_size, scale=scale,
                                       logits_soft_cap=logits_soft_cap, implementation=implementation)

    run = common.shard_sequence(body, mesh, axis_name, batch_axes, 5, 1, ranks=(4, 4, 4, 2, 2, 4), replicated=1)
    return run(query, key, value, query_segment_ids, key_segment_ids, sinks)
