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
                                   kv_lengths=None, block_mask=None, block_shape=None, implementation=None):
    """Gradients `(dq, dk, dv)` (plus `dbias` when `bias` is given) of `dot_product_attention`.

    Args:
      query, key, value, bias, mask, scale, is_causal, local_window_size, query_segment_ids, key_segment_ids,
        implementation: as in `dot_product_attention` (same checks, same backends).
      out: `[B, T, N, Hv]`, any float dtype (fp32 keeps `delta` exact).
      lse: `[B, N, T]` fp32 log-sum-exp of the masked, scaled logits (`-inf` for a row that sees no key).
      d_out: cotangent of `out`, `[B, T, N, Hv]`.
      d_lse: optional cotangent of `lse`, `[B, N, T]`.
      sinks, logits_soft_cap, kv_lengths, block_mask, block_shape: as in `dot_product_attention`. `lse` must
        then include the sink; `(dq, dk, dv)` need only that `lse`, and `dsinks = -sum p_sink * delta` is
        returned after them (for a ring, pass the sinks once, e.g. with the last block, or use
        `jaxattn.core.softmax.sink_gradient` on the merged result).

    The backward uses `p = exp(s - lse)` and `ds = p * (dp - delta)` with `dp = d_out v^T` and
    `delta = rowsum(d_out * out) - d_lse`. With the `out`/`lse` this op returned for these very keys that is
    its exact VJP. With the GLOBAL `out`/`lse` of a softmax merged over several key blocks (ring attention) it
    is exactly that block's share of the merged result's gradient: `dk`, `dv` of the block and its
    contribution to `dq` (sum those over the blocks). 'reference' evaluates the same formula with the
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
    b, t, n, _ = query.shape
    rows = (b, t, n, value.shape[-1])
    for name, x, want, layout in (("out", out, rows, api.LAYOUT_Q), ("d_out", d_out, rows, api.LAYOUT_Q),
                                  ("lse", lse, (b, n, t), "[batch, num_heads, q_len]"),
                                  ("d_lse", d_lse, (b, n, t), "[batch, num_heads, q_len]")):
        if x is None and name == "d_lse":
            continue
        validation.check_floating(name, x)
        if tuple(x.shape) != want:
            raise ValueError(f"`{name}` must have shape {want} {layout} for query {tuple(query.shape)} and "
                             f"value {tuple(value.shape)}, got {tuple(x.shape)}")
    lse = jnp.asarray(lse, jnp.float32)
    d_lse = None if d_lse is None else jnp.asarray(d_lse, jnp.float32)
    kwargs = {name: x for name, x in (("kv_lengths", extras.kv_lengths), ("block_mask", extras.block_mask))
              if x is not None}

    def run(impl):
        return impl(query, key, value, bias, mask, query_segment_ids, key_segment_ids, out, lse, d_out, d_lse,
                    scale=scale, spec=spec, want_dbias=bias is not None, **kwargs)

    dq, dk, dv, dbias = dispatch.call(OP, implementation, run, query=query, key=key, value=value, bias=bias,
                                      mask=mask, spec=spec, segment_ids=query_segment_ids is not None,
                                      features=op_features.used(spec, extras))
    grads = (dq, dk, dv) if bias is None else (dq, dk, dv, dbias)
    if sinks is not None:
        delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [B, T, N]
        delta = jnp.swapaxes(delta, 1, 2) - (0.0 if d_lse is None else d_lse)
        dsinks = softmax.sink_gradient(extras.sinks.astype(jnp.float32)[None, :, None], lse, delta, (0, 2))
        grads = grads + (dsinks.astype(extras.sinks.dtype),)
    return grads


def _reference_backward(*args, scale, spec, want_dbias, **features):
    from jaxattn.dot_product.reference import attention_backward_reference

    del want_dbias
    return attention_backward_reference(*args, scale=scale, spec=spec, **features)
