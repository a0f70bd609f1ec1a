"""All-gather K/V attention (Llama-3 style): gather K/V over the context axis once, then attend locally.

One `all_gather` of K/V per layer (its VJP is one reduce-scatter of dK/dV); cheap when K/V heads are few (GQA,
MQA), at the price of holding the whole sequence's K/V on every device. Non-causal attention is one op call on the
gathered K/V. Under a causal mask the gathered K/V is visited shard by shard with the same per-block plan as the
ring (`ring.ring_step`): the own shard is the causal diagonal, earlier shards are fully visible, later ones are
skipped; with the zigzag layout every device computes the same amount. Gradients are JAX's (through the op's VJP),
so the backward keeps one residual block per gathered shard: O(sequence) per device, like the gathered K/V.
"""
from __future__ import annotations

import functools

import jax

from jaxattn.context_parallel import common, ring
from jaxattn.core import softmax


def allgather_attention_local(query, key, value, *, axis_name: str = "context", is_causal: bool = False,
                              zigzag_layout: bool = False, scale: float | None = None, implementation=None):
    """Per-device body (call inside `shard_map`): local `[B, T/n, N, H]` queries, `[B, T/n, K, H]` keys/values.

    zigzag_layout: the shards are in zigzag order (`zigzag.to_zigzag_local`); only matters when causal.
    """
    scale = common.local_scale(query, scale, is_causal=is_causal, zigzag_layout=zigzag_layout)
    k_all = jax.lax.all_gather(key, axis_name, axis=1, tiled=True)
    v_all = jax.lax.all_gather(value, axis_name, axis=1, tiled=True)
    if not is_causal:
        out, _ = ring.block_partial(query, k_all, v_all, False, scale, implementation)
        return out.astype(query.dtype)

    n = jax.lax.axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    shard = key.shape[1]

    def fn(q_side, kv_side, causal):
        return ring.block_partial(q_side[0], *kv_side, causal, scale, implementation)

    def visit(s, acc):
        # The shard `s` places before this one on the ring (the plan `ring_step` knows how to mask).
        start = ((r - s) % n) * shard
        kv = tuple(jax.lax.dynamic_slice_in_dim(x, start, shard, axis=1) for x in (k_all, v_all))
        part = ring.ring_step(fn, (query,), kv, (0.0, softmax.NEG_INF), 2, step=s, axis_name=axis_name,
                              is_causal=True, zigzag_layout=zigzag_layout)
        return ring.merge(acc, part)

    acc = fn((query,), (key, value), True)  # own shard: the diagonal, no gathered copy needed
    out, _ = jax.lax.fori_loop(1, n, visit, acc)
    return out.astype(query.dtype)


def allgather_attention(query, key, value, *, axis_name: str = "context", mesh=None, batch_axes=None,
                        is_causal: bool = False, load_balance: bool = True, zigzag_order: bool = False,
                        scale: float | None = None, implementation=None):
    """Softmax attention with the sequence sharded over `axis_name`, K/V all-gathered; equals
    `dot_product_attention`.

    Args and layout as `ring_attention`: global `query [B, T, N, H]`, `key [B, T, K, H]`, `value [B, T, K, Hv]`
    (`N % K == 0`); `mesh=None` is the current mesh, `batch_axes=None` every other mesh axis; `load_balance`
    uses the zigzag layout under `is_causal` (`T % (2 * axis size) == 0`), `zigzag_order` says the caller's arrays
    already are in that order. Lengths not divisible by the axis size raise `ValueError`.

    Returns:
      `[B, T, N, Hv]` in the query dtype, sharded like `query`.
    """
    local = functools.partial(allgather_attention_local, scale=scale, implementation=implementation)
    return ring.run_sharded(local, query, key, value, axis_name=axis_name, mesh=mesh, batch_axes=batch_axes,
                            is_causal=is_causal, load_balance=load_balance, zigzag_order=zigzag_order)
