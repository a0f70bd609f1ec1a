"""`dot_product_attention_backward`: the gradients of dot-product attention from a saved `(out, lse)`.

For callers that run the forward themselves and keep its results (ring attention, pipelined or fused layers):
the backward recomputes each block's probabilities from `lse` (FlashAttention-2 style) and repeats no forward.
Same validation and dispatch rule as `dot_product_attention` (`None`: the flash kernel lowered for TPU/GPU, xla
for CPU).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import dispatch, softmax, validation
from jaxattn.dot_product import api
from jaxattn.dot_product import features as op_features

OP = "dot_product_attention_backward"


def _load_reference():
    return op_features.tagged("reference", _reference_backward)


def _load_xla():
    from jaxattn.dot_product.xla import attention_blocked_backward

    def backward(*args, scale, spec, want_dbias, **features):
        del want_dbias  # the blocked backward returns dbias whenever there is a bias
        return attention_blocked_backward(*args, scale=scale, spec=spec, **features)
    return op_features.tagged("xla", backward)


def _load_pallas():
    from jaxattn.dot_product.kernel_backward import pallas_backward
    return op_features.tagged("pallas", pallas_backward)


def _load_triton():
    from jaxattn.dot_product.kernel_backward import triton_backward
    return op_features.tagged("triton", triton_backward)


dispatch.register(OP, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
dispatch.register(OP, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))
dispatch.register(OP, dispatch.Backend("pallas", _load_pallas, platforms=("tpu", "gpu"), priority=1,
                                       supports=api.flash_supports, takes_target=True))
dispatch.register(OP, dispatch.Backend("triton", _load_triton, platforms=("gpu",), priority=2,
                                       supports=api.triton_supports, runs_on=("gpu",)))


def dot_product_attention_backward(query, key, value, out, lse, d_out, *, bias=None, mask=None, scale=None,
                                   is_causal=False, local_window_size=None, query_segment_ids=None,
                                   key_segment_ids=None, d_lse=None, sinks=None, logits_soft_cap=None,
                                   kv_lengths=None, block_mask=None, block_shape=None, delta=None,
                                   implementation=None):
    """Gradients `(dq, dk, dv)` (plus `dbias` when `bias` is given) of `dot_product_attention`.

    Args:
      query, key, value, bias, mask, scale, is_causal, local_window_size, query_segment_ids, key_segment_ids,
        implementation: as in `dot_product_attention` (same checks, same backends).
      out: `[B, T, N, Hv]`, any float dtype (fp32 keeps `delta` exact); may be None when `delta` is given (it is
        then not read).
      lse: `[B, N, T]` fp32 log-sum-exp of the masked, scaled logits (`-inf` for a row that sees no key).
      d_out: cotangent of `out`, `[B, T, N, Hv]`.
      d_lse: optional cotangent of `lse`, `[B, N, T]`; must be None when `delta` is given (it is inside it).
      sinks, logits_soft_cap, kv_lengths, block_mask, block_shape: as in `dot_product_attention`. `lse` must
        then include the sink; `(dq, dk, dv)` need only that `lse`, and `dsinks = -sum p_sink * delta` is
        returned after them (for a ring, pass the sinks once, e.g. with the last block, or use
        `jaxattn.core.softmax.sink_gradient` on the merged result).
      delta: optional precomputed `[B, N, T]` fp32 `rowsum(d_out * out) - d_lse`
        (`jaxattn.core.softmax.backward_delta_heads_last(out, d_out, d_lse)`), for a caller that runs several
        backwards against one output (ring attention: one per key block) and computes it once. The sinks'
        gradient uses it too.

    The backward uses `p = exp(s - lse)` and `ds = p * (dp - delta)` with `dp = d_out v^T` and
    `delta = rowsum(d_out * out) - d_lse` (computed once here, or given, and handed to the backend). With the
    `out`/`lse` this op returned for these very keys that is its exact VJP. With the GLOBAL `out`/`lse` (or
    `delta`) of a softmax merged over several key blocks (ring attention) it is exactly that block's share of
    the merged result's gradient: `dk`, `dv` of the block and its contribution to `dq` (sum those over the
    blocks). 'reference' evaluates the same formula with the
    `T x S` logits materialised.

    Returns:
      `(dq, dk, dv)` in the dtypes of query/key/value, then `dbias` shaped like `bias` when `bias` is given,
      then `dsinks [N]` when `sinks` is given.
    """
    spec, scale = api._validate(query, key, value, bias, mask, scale, is_causal, local_window_size,
                                query_segment_ids, key_segment_ids, logits_soft_cap=logits_soft_cap,
                                block_mask=block_mask, block_shape=block_shape)
    extras = op_features.validate(query, key, value, spec, sinks=sinks, kv_lengths=kv_lengths,
                                  block_mask=block_mask)
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    delta = _delta(query, value, out, d_out, lse, d_lse, delta)
    lse = jnp.asarray(lse, jnp.float32)
    kwargs = {name: x for name, x in (("kv_lengths", extras.kv_lengths), ("block_mask", extras.block_mask))
              if x is not None}

    def run(impl):  # the backends get `delta` alone: none of them reads `out` or `d_lse`
        return impl(query, key, value, bias, mask, query_segment_ids, key_segment_ids, None, lse, d_out, None,
                    scale=scale, spec=spec, want_dbias=bias is not None, delta=delta, **kwargs)

    dq, dk, dv, dbias = dispatch.call(OP, implementation, run, query=query, key=key, value=value, bias=bias,
                                      mask=mask, spec=spec, segment_ids=query_segment_ids is not None,
                                      features=op_features.used(spec, extras))
    grads = (dq, dk, dv) if bias is None else (dq, dk, dv, dbias)
    if sinks is not None:
        dsinks = softmax.sink_gradient(extras.sinks.astype(jnp.float32)[None, :, None], lse, delta, (0, 2))
        grads = grads + (dsinks.astype(extras.sinks.dtype),)
    return grads


def _delta(query, value, out, d_out, lse, d_lse, delta):
    """Checks the row arrays against the query/value shapes; returns fp32 `delta [B, N, T]` (the given one, or
    computed once from `out`, `d_out`, `d_lse`)."""
    if delta is not None and d_lse is not None:
        raise ValueError("give `d_lse` or a precomputed `delta`, not both: `delta = rowsum(d_out * out) - d_lse` "
                         "already contains the lse cotangent")
    if delta is None and out is None:
        raise ValueError("`out` is required unless a precomputed `delta` is given")
    b, t, n, _ = query.shape
    rows, stats = (b, t, n, value.shape[-1]), (b, n, t)
    for name, x, want, layout in (("out", out, rows, api.LAYOUT_Q), ("d_out", d_out, rows, api.LAYOUT_Q),
                                  ("lse", lse, stats, _LAYOUT_ROWS), ("d_lse", d_lse, stats, _LAYOUT_ROWS),
                                  ("delta", delta, stats, _LAYOUT_ROWS)):
        if x is None and name in ("out", "d_lse", "delta"):
            continue
        validation.check_floating(name, x)
        if tuple(x.shape) != want:
            raise ValueError(f"`{name}` must have shape {want} {layout} for query {tuple(query.shape)} and "
                             f"value {tuple(value.shape)}, got {tuple(x.shape)}")
    if delta is not None:
        return jnp.asarray(delta, jnp.float32)
    return softmax.backward_delta_heads_last(jnp.asarray(out), jnp.asarray(d_out), d_lse)


_LAYOUT_ROWS = "[batch, num_heads, q_len]"


def _reference_backward(*args, scale, spec, want_dbias, **features):
    from jaxattn.dot_product.reference import attention_backward_reference

    del want_dbias
    return attention_backward_reference(*args, scale=scale, spec=spec, **features)
