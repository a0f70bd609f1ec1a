"""All-gather K/V attention (Llama-3 style): gather K/V over the context axis once, then attend locally.

One `all_gather` of K/V per layer (its VJP is one reduce-scatter of dK/dV); cheap when K/V heads are few (GQA,
MQA), at the price of holding the whole sequence's K/V on every device. Non-causal attention is one op call on the
gathered K/V. Under a causal mask the gathered K/V is visited shard by shard with the same per-block plan as the
ring (`ring.ring_step`): the own shard is the causal diagonal, earlier shards are fully visible, later ones are
skipped; with the zigzag layout every device computes the same amount. Gradients are JAX's (through the op's VJP),
so the backward keeps one residual block per gathered shard: O(sequence) per device, like the gathered K/V.
Segment ids: the key ids are gathered with K/V. A local window (`local_window_size`) slices the keys it reads
out of the gathered sequence and runs the op once on them (`ring.windowed_local`): work stops growing with `T`,
the gather's traffic does not (the ring's window sends only the border tokens).
"""
from __future__ import annotations

import functools

import jax

from jaxattn.context_parallel import common, ring
from jaxattn.core import softmax


def allgather_attention_local(query, key, value, *, axis_name: str = "context", is_causal: bool = False,
                              zigzag_layout: bool = False, scale: float | None = None, local_window_size=None,
                              query_segment_ids=None, key_segment_ids=None, sinks=None, logits_soft_cap=None,
                              implementation=None):
    """Per-device body (call inside `shard_map`, `check_vma` on or off): local `[B, T/n, N, H]` queries,
    `[B, T/n, K, H]` keys/values, optional local segment ids `[B, T/n]` (both or neither).

    zigzag_layout: the shards are in zigzag order (`zigzag.to_zigzag_local`); only matters when causal.
    local_window_size: global `w` or `(left, right)`, contiguous shards only.
    sinks `[N]`, logits_soft_cap: as `dot_product_attention` (the sink merged once, after the shards).
    """
    scale = common.local_scale(query, scale, is_causal=is_causal, zigzag_layout=zigzag_layout)
    gather = lambda x: None if x is None else jax.lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
    k_all, v_all, ids_all = gather(key), gather(value), gather(key_segment_ids)
    if local_window_size is not None:
        return ring.windowed_local(query, key, value, query_segment_ids, key_segment_ids, local_window_size,
                                   axis_name=axis_name, is_causal=is_causal, zigzag_layout=zigzag_layout,
                                   scale=scale, implementation=implementation, gathered=(k_all, v_all, ids_all),
                                   sinks=sinks, logits_soft_cap=logits_soft_cap)
    q_ids = () if query_segment_ids is None else (query_segment_ids,)
    if not is_causal:
        out, lse = ring.block_partial(query, k_all, v_all, False, scale, implementation, *q_ids, *(
            () if ids_all is None else (ids_all,)), soft_cap=logits_soft_cap)
        return ring.finish(out, lse, sinks).astype(query.dtype)

    n = jax.lax.axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    shard = key.shape[1]

    def fn(q_side, kv_side, causal):
        return ring.block_partial(q_side[0], kv_side[0], kv_side[1], causal, scale, implementation, *q_side[1:],
                                  *kv_side[2:], soft_cap=logits_soft_cap)

    everything = tuple(x for x in (k_all, v_all, ids_all) if x is not None)
    own = tuple(x for x in (key, value, key_segment_ids) if x is not None)

    def visit(s, acc):
        # The shard `s` places before this one on the ring (the plan `ring_step` knows how to mask).
        start = ((r - s) % n) * shard
        kv = tuple(jax.lax.dynamic_slice_in_dim(x, start, shard, axis=1) for x in everything)
        part = ring.ring_step(fn, (query, *q_ids), kv, (0.0, softmax.NEG_INF), 2, step=s, axis_name=axis_name,
                              is_causal=True, zigzag_layout=zigzag_layout)
        return ring.merge(acc, part)

    acc = fn((query, *q_ids), own, True)  # own shard: the diagonal, no gathered copy needed
    out, lse = jax.lax.fori_loop(1, n, visit, acc)
    return ring.finish(out, lse, sinks).astype(query.dtype)


def allgather_attention(query, key, value, *, axis_name: str = "context", mesh=None, batch_axes=None,
                        is_causal: bool = False, load_balance: bool = True, zigzag_order: bool = False,
                        scale: float | None = None, local_window_size=None, query_segment_ids=None,
                        key_segment_ids=None, sinks=None, logits_soft_cap=None, implementation=None):
    """Softmax attention with the sequence sharded over `axis_name`, K/V all-gathered; equals
    `dot_product_attention`.

    Args and layout as `ring_attention`: global `query [B, T, N, H]`, `key [B, T, K, H]`, `value [B, T, K, Hv]`
    (`N % K == 0`); `mesh=None` is the current mesh, `batch_axes=None` every other mesh axis; `load_balance`
    uses the zigzag layout under `is_causal` (`T % (2 * axis size) == 0`), `zigzag_order` says the caller's arrays
    already are in that order; `local_window_size` (contiguous shards), `query_segment_ids` / `key_segment_ids`
    (`[B, T]`, both or neither), `sinks` (`[N]`, merged once) and `logits_soft_cap` as the op. Lengths not
    divisible by the axis size raise `ValueError`. Inside a `shard_map` manual over `axis_name` the arrays are shards and the body runs on them.

    Returns:
      `[B, T, N, Hv]` in the query dtype, sharded like `query`.
    """
    local = functools.partial(allgather_attention_local, scale=scale, logits_soft_cap=logits_soft_cap,
                              implementation=implementation)
    return ring.run_sharded(local, query, key, value, query_segment_ids, key_segment_ids, sinks, axis_name=axis_name,
                            mesh=mesh, batch_axes=batch_axes, is_causal=is_causal, load_balance=load_balance,
                            zigzag_order=zigzag_order, local_window_size=local_window_size)
