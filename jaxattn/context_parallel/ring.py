"""Ring attention: each device keeps its queries while K/V shards travel round the ring (`lax.ppermute`).

Step `s` of `n`: device `r` attends to the K/V shard of device `(r - s) mod n` with the dot-product op (so the
platform's kernel runs), the partial results merge exactly through their log-sum-exp, and the next shard is
already on its way (the `ppermute` is issued before the compute so XLA can overlap them).

Causal masks from global chunk positions, per step:
- contiguous shards: step 0 is the causal diagonal; later steps are either fully visible (source before this
  device) or fully masked, and then skipped (`lax.cond`): device `r` computes `r + 1` of `n` blocks.
- zigzag shards (`load_balance=True`, device `r` holds chunks `r` and `2n-1-r`): step 0 is the local causal mask
  (exact, the two chunks are in increasing order); every later step is half a block, either all queries against
  the source's early chunk or this device's late chunk against the whole source shard. Every device does the
  same work.

Backward (`custom_vjp`): `delta = rowsum(d_out * out) - d_lse` of the GLOBAL merged output is computed once,
before the ring; then the same ring again, each step running the op's backward alone
(`dot_product_attention_backward`: the platform's flash backward, no forward repeated) on its block with that
`delta` and the global merged lse (the output itself is not read again), and the dK/dV accumulators travel round
the ring with their K/V, arriving home after `n` hops. Memory stays O(local shard).

Segment ids (packed sequences): the key ids travel round the ring with K/V, each block gets its slice of both.
Local windows (`local_window_size`): no ring at all; each device receives only the border tokens its window
reads from the shards it reaches (`window.py`), so traffic and work stop growing with `T`; the layout is then
contiguous (a window balances the causal work by itself). Sinks are merged once, after the ring (`finish`); the
custom VJP returns `(out, lse)` so the sink's merge outside it differentiates into `d_lse`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.context_parallel import common, window, zigzag
from jaxattn.core import softmax, vma
from jaxattn.dot_product.api import dot_product_attention
from jaxattn.dot_product.backward import dot_product_attention_backward

# ----------------------------------------------------------------------------------------------------------
# One block: the op on a query chunk and a key chunk, forward partials and lse-based gradients.


def block_partial(q, k, v, causal, scale, implementation, q_ids=None, k_ids=None, soft_cap=None):
    """fp32 `(out [B, T, N, Hv], lse [B, T, N])` of attention of `q` to `k`/`v` (causal aligned top-left),
    optionally with segment ids `[B, T]`, `[B, S]` and a logit soft-cap."""
    out, lse = dot_product_attention(q, k, v, scale=scale, is_causal=causal, return_lse=True,
                                     query_segment_ids=q_ids, key_segment_ids=k_ids, logits_soft_cap=soft_cap,
                                     implementation=implementation)
    return out.astype(jnp.float32), jnp.swapaxes(lse, 1, 2)


def block_grads(q, k, v, lse, d_out, delta, causal, scale, implementation, q_ids=None, k_ids=None,
                soft_cap=None):
    """This block's share of `(dq, dk, dv)` (fp32) given the final merged fp32 `lse` and
    `delta = rowsum(d_out * out) - d_lse` of the merged `out`, both `[B, T, N]`.

    The merged softmax restricted to this block's keys is `p = exp(s - lse)` with the merged `lse`, and its
    `delta` is the merged one; the op's backward computes exactly that, so the block's `dk`, `dv` and its share
    of `dq` come out exact with no forward recomputation (5 block matmuls, not 7).
    """
    dq, dk, dv = dot_product_attention_backward(q, k, v, None, jnp.swapaxes(lse, 1, 2), d_out, scale=scale,
                                                is_causal=causal, query_segment_ids=q_ids, key_segment_ids=k_ids,
                                                delta=jnp.swapaxes(delta, 1, 2), logits_soft_cap=soft_cap,
                                                implementation=implementation)
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


def merge(acc, part):
    return softmax.merge_partials(acc[0], acc[1], part[0], part[1])


def empty_partial(q, v):
    """Zero output and `-inf` lse: the merge's identity (varying like `q`, to start a scan carry)."""
    b, t, n, _ = q.shape
    acc = jnp.zeros((b, t, n, v.shape[-1]), jnp.float32), jnp.full((b, t, n), softmax.NEG_INF, jnp.float32)
    return vma.varying_like(acc, q)


# ----------------------------------------------------------------------------------------------------------
# Which part of a block a step computes. `fn(q_side, kv_side, causal)` returns arrays indexed by query rows
# (`q_outs` of them: out/lse or dq) followed by arrays indexed by key rows (dk, dv); `fills` pad skipped rows.

def _pad(x, before, after, axis, fill):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, constant_values=fill)


def _half_block(fn, q_side, kv_side, fills, q_outs, late_queries):
    """Zigzag step after the first: all queries vs the early key chunk, or the late query chunk vs all keys."""
    if late_queries:
        c = q_side[0].shape[1] // 2
        res = fn(tuple(x[:, c:] for x in q_side), kv_side, False)
        return tuple(_pad(x, c, 0, 1, f) if i < q_outs else x for i, (x, f) in enumerate(zip(res, fills)))
    c = kv_side[0].shape[1] // 2
    res = fn(q_side, tuple(x[:, :c] for x in kv_side), False)
    return tuple(x if i < q_outs else _pad(x, 0, c, 1, f) for i, (x, f) in enumerate(zip(res, fills)))


def _skipped(fn, q_side, kv_side, fills):
    shapes = jax.eval_shape(lambda a, b: fn(a, b, False), q_side, kv_side)
    return vma.varying_like(tuple(jnp.full(s.shape, f, s.dtype) for s, f in zip(shapes, fills)), q_side, kv_side)


def ring_step(fn, q_side, kv_side, fills, q_outs, *, step, axis_name, is_causal, zigzag_layout):
    """Runs `fn` on the part of the (query shard, shard from `step` hops back) block the causal mask leaves.

    `step` is a Python int for step 0 (the diagonal) and may be traced afterwards.
    """
    if not is_causal:
        return fn(q_side, kv_side, False)
    if isinstance(step, int) and step == 0:
        return fn(q_side, kv_side, True)
    earlier = step <= jax.lax.axis_index(axis_name)  # the source device precedes this one
    if zigzag_layout:
        return jax.lax.cond(earlier, lambda: _half_block(fn, q_side, kv_side, fills, q_outs, False),
                            lambda: _half_block(fn, q_side, kv_side, fills, q_outs, True))
    return jax.lax.cond(earlier, lambda: fn(q_side, kv_side, False), lambda: _skipped(fn, q_side, kv_side, fills))


# ----------------------------------------------------------------------------------------------------------
# The ring, per device.

def _rotate(xs, axis_name):
    n = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(xs, axis_name, [(j, (j + 1) % n) for j in range(n)])


def _forward(q, k, v, q_ids, k_ids, cfg):
    axis_name, is_causal, zigzag_layout, scale, implementation, soft_cap = cfg
    n = jax.lax.axis_size(axis_name)
    q_side = (q,) if q_ids is None else (q, q_ids)

    def fn(q_side, kv_side, causal):
        return block_partial(q_side[0], kv_side[0], kv_side[1], causal, scale, implementation, *q_side[1:],
                             *kv_side[2:], soft_cap=soft_cap)

    def step(s, kv, acc):
        part = ring_step(fn, q_side, kv, (0.0, softmax.NEG_INF), 2, step=s, axis_name=axis_name,
                         is_causal=is_causal, zigzag_layout=zigzag_layout)
        return merge(acc, part)

    def body(s, carry):
        kv, acc = carry
        return _rotate(kv, axis_name), step(s, kv, acc)  # the next shard is in flight during this step's compute

    carry = ((k, v) if k_ids is None else (k, v, k_ids)), empty_partial(q, v)
    if n > 1:
        carry = body(0, carry)
        carry = jax.lax.fori_loop(1, n - 1, body, carry)
    kv_last, acc = carry
    return step(n - 1, kv_last, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_ids, k_ids, cfg):
    """fp32 `(out, lse [B, T, N])` over every key of the ring (no sink: `ring_attention_local` merges it once)."""
    return _forward(q, k, v, q_ids, k_ids, cfg)


def _ring_fwd(q, k, v, q_ids, k_ids, cfg):
    out, lse = _forward(q, k, v, q_ids, k_ids, cfg)
    return (out, lse), (q, k, v, q_ids, k_ids, out, lse)


def _ring_bwd(cfg, residuals, cotangents):
    axis_name, is_causal, zigzag_layout, scale, implementation, soft_cap = cfg
    q, k, v, q_ids, k_ids, out, lse = residuals
    d_out, d_lse = cotangents
    n = jax.lax.axis_size(axis_name)
    delta = softmax.backward_delta(out, d_out, d_lse)  # [B, T, N], once for every step
    q_side = (q, lse, d_out, delta) + (() if q_ids is None else (q_ids,))

    def fn(q_side, kv_side, causal):
        return block_grads(q_side[0], kv_side[0], kv_side[1], *q_side[1:4], causal, scale, implementation,
                           *q_side[4:], *kv_side[2:], soft_cap=soft_cap)

    def body(s, carry, last=False):
        kv, dq, dk, dv = carry
        kv_next = kv if last else _rotate(kv, axis_name)
        dq_b, dk_b, dv_b = ring_step(fn, q_side, kv, (0.0, 0.0, 0.0), 1, step=s, axis_name=axis_name,
                                     is_causal=is_causal, zigzag_layout=zigzag_layout)
        # dK/dV travel with their K/V: after n hops they are back on the device that owns them.
        dk, dv = _rotate((dk + dk_b, dv + dv_b), axis_name)
        return kv_next, dq + dq_b, dk, dv

    zeros = lambda x: vma.varying_like(jnp.zeros(x.shape, jnp.float32), q)  # noqa: E731
    carry = ((k, v) if k_ids is None else (k, v, k_ids)), zeros(q), zeros(k), zeros(v)
    if n > 1:
        carry = body(0, carry)
        carry = jax.lax.fori_loop(1, n - 1, body, carry)
    _, dq, dk, dv = body(n - 1, carry, last=True)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_local(query, key, value, *, axis_name: str = "context", is_causal: bool = False,
                         zigzag_layout: bool = False, scale: float | None = None, local_window_size=None,
                         query_segment_ids=None, key_segment_ids=None, sinks=None, logits_soft_cap=None,
                         implementation=None):
    """Per-device body (call inside `shard_map`, `check_vma` on or off): local `[B, T/n, N, H]` queries,
    `[B, T/n, K, H]` keys/values, optional local segment ids `[B, T/n]` (both or neither).

    zigzag_layout: the shards are in zigzag order (`zigzag.to_zigzag_local`); only matters when causal.
    local_window_size: global `w` or `(left, right)`, contiguous shards only (module docstring).
    sinks `[N]`, logits_soft_cap: as `dot_product_attention`; the sink is merged once, after the ring.
    """
    scale = common.local_scale(query, scale, is_causal=is_causal, zigzag_layout=zigzag_layout)
    if local_window_size is not None:
        return windowed_local(query, key, value, query_segment_ids, key_segment_ids, local_window_size,
                              axis_name=axis_name, is_causal=is_causal, zigzag_layout=zigzag_layout, scale=scale,
                              implementation=implementation, gathered=None, sinks=sinks,
                              logits_soft_cap=logits_soft_cap)
    cfg = (axis_name, bool(is_causal), bool(zigzag_layout), float(scale), implementation,
           None if logits_soft_cap is None else float(logits_soft_cap))
    out, lse = _ring(query, key, value, query_segment_ids, key_segment_ids, cfg)
    return finish(out, lse, sinks).astype(query.dtype)


def finish(out, lse, sinks):
    """The merged fp32 `out` with the sink logits `[N]` (or None) added to its denominator, once."""
    return out if sinks is None else softmax.merge_sink(out, lse, sinks.astype(jnp.float32))[0]


def windowed_local(query, key, value, query_ids, key_ids, local_window_size, *, axis_name, is_causal,
                   zigzag_layout, scale, implementation, gathered, sinks=None, logits_soft_cap=None):
    """Windowed body shared by ring and all-gather: the border tokens the window reads, from the neighbours
    (`gathered=None`) or sliced from the all-gathered `(keys, values, key ids or None)` of the whole sequence."""
    if zigzag_layout:
        raise ValueError("`local_window_size` needs contiguous shards, not the zigzag layout (a window balances "
                         "causal work by itself): pass `load_balance=False` / `zigzag_order=False`")
    n, shard = jax.lax.axis_size(axis_name), query.shape[1]
    band = window.window_band(local_window_size, is_causal, n * shard)
    hl, hr = window.halo_sizes(band, shard, n)
    arrays = [key, value] + ([] if key_ids is None else [key_ids])
    if gathered is None:
        ext = window.exchange_borders(arrays, 1, hl, hr, axis_name)
    else:
        start = jax.lax.axis_index(axis_name) * shard
        ext = [jax.lax.dynamic_slice_in_dim(jnp.pad(x, [(0, 0), (hl, hr)] + [(0, 0)] * (x.ndim - 2)), start,
                                            hl + shard + hr, axis=1) for x in gathered if x is not None]
    return window.attend_with_halo(query, ext[0], ext[1], query_ids, ext[2] if len(ext) > 2 else None,
                                   band=band, halo=(hl, hr), axis_name=axis_name, scale=scale,
                                   implementation=implementation, sinks=sinks,
                                   logits_soft_cap=logits_soft_cap).astype(query.dtype)


def ring_attention(query, key, value, *, axis_name: str = "context", mesh=None, batch_axes=None,
                   is_causal: bool = False, load_balance: bool = True, zigzag_order: bool = False,
                   scale: float | None = None, local_window_size=None, query_segment_ids=None,
                   key_segment_ids=None, sinks=None, logits_soft_cap=None, implementation=None):
    """Softmax attention with the sequence sharded over mesh axis `axis_name`; equals `dot_product_attention`.

    Args:
      query: global `[B, T, N, H]`; key, value: global `[B, T, K, H]`, `[B, T, K, Hv]` (`N % K == 0`, GQA);
        self-attention over one sharded sequence, so keys have the queries' length.
      axis_name, mesh, batch_axes: the mesh axis that splits the sequence; `mesh=None` uses the current mesh;
        `batch_axes=None` splits the batch over every other mesh axis. Called inside a `shard_map` that is
        manual over `axis_name`, the arrays are that device's shards and the per-device body runs on them.
      is_causal: query `i` sees keys `j <= i` (global positions).
      load_balance: with `is_causal`, use the zigzag layout so every device does the same work (needs
        `T % (2 * axis size) == 0`). Without it the last device does `n` blocks and the first one. Ignored with
        `local_window_size` (contiguous shards).
      zigzag_order: the caller's arrays are already in zigzag order (`zigzag_permute`, e.g. tokens and positions
        permuted once in the data pipeline) and the output stays in that order. When False (default) and
        load-balanced, the shards are moved into zigzag order and back here (one exchange of q, k, v and out).
      scale: logit scale, default `H ** -0.5`.
      local_window_size: `w` or `(left, right)` as `dot_product_attention`: only the neighbours the window
        reaches send their border tokens (`left + right` per device whatever `T`); not with `zigzag_order`.
      query_segment_ids, key_segment_ids: integer `[B, T]` each, both or neither (packed sequences): a query
        sees only keys of its segment; sharded like the sequence, the key ids travel with K/V.
      sinks: `[N]` sink logits (replicated), counted once in each query's denominator after the ring's merge.
      logits_soft_cap: `cap * tanh(s / cap)` on every block's scaled logits.
      implementation: forwarded to `dot_product_attention` for every block.

    Returns:
      `[B, T, N, Hv]` in the query dtype, sharded like `query`.

    Lengths not divisible by the axis size (twice it when zig-zagging) raise `ValueError`; pad first.
    """
    local = functools.partial(ring_attention_local, scale=scale, logits_soft_cap=logits_soft_cap,
                              implementation=implementation)
    return run_sharded(local, query, key, value, query_segment_ids, key_segment_ids, sinks, axis_name=axis_name,
                       mesh=mesh, batch_axes=batch_axes, is_causal=is_causal, load_balance=load_balance,
                       zigzag_order=zigzag_order, local_window_size=local_window_size)


def run_sharded(local_fn, query, key, value, query_segment_ids=None, key_segment_ids=None, sinks=None, *,
                axis_name, mesh, batch_axes, is_causal, load_balance, zigzag_order, local_window_size=None):
    """Validates, then runs `local_fn(q, k, v, axis_name=, is_causal=, zigzag_layout=, local_window_size=,
    query_segment_ids=, key_segment_ids=, sinks=)` under `shard_map` (`sinks` replicated), moving natural-order
    shards into zigzag order and back when load-balancing a causal mask (never with a window)."""
    mesh = common.resolve_mesh(mesh)
    common.check_qkv(query, key, value)
    common.check_segment_ids(query, query_segment_ids, key_segment_ids)
    common.check_sinks(query, sinks)
    if zigzag_order and not load_balance:
        raise ValueError("`zigzag_order=True` describes a load-balanced layout; it needs `load_balance=True`")
    if local_window_size is not None:
        window.window_band(local_window_size, is_causal, query.shape[1])  # checks the window itself
        if zigzag_order:
            raise ValueError("`local_window_size` needs contiguous shards: not with `zigzag_order=True`")
    zig = bool(is_causal and load_balance and local_window_size is None)
    ids = {} if query_segment_ids is None else {"query_segment_ids": query_segment_ids,
                                                 "key_segment_ids": key_segment_ids}
    common.check_sequence_inputs(mesh, axis_name, batch_axes, 2 if (zig or zigzag_order) else 1,
                                 query=query, key=key, value=value, **ids)
    move = zig and not zigzag_order

    def body(q, k, v, q_ids, k_ids, sinks):
        if move:
            q, k, v, q_ids, k_ids = (None if x is None else zigzag.to_zigzag_local(x, axis_name)
                                     for x in (q, k, v, q_ids, k_ids))
        out = local_fn(q, k, v, axis_name=axis_name, is_causal=is_causal, zigzag_layout=zig,
                       local_window_size=local_window_size, query_segment_ids=q_ids, key_segment_ids=k_ids,
                       sinks=sinks)
        return zigzag.from_zigzag_local(out, axis_name) if move else out

    run = common.shard_sequence(body, mesh, axis_name, batch_axes, 5, 1, ranks=(4, 4, 4, 2, 2, 4), replicated=1)
    return run(query, key, value, query_segment_ids, key_segment_ids, sinks)
