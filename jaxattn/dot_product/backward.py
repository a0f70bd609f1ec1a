"""`dot_product_attention_backward`: the gradients of dot-product attention from a saved `(out, lse)`.

For callers that run the forward themselves and keep its results (ring attention, pipelined or fused layers):
the backward recomputes each block's probabilities from `lse` (FlashAttention-2 style) and repeats no forward.
Same validation and dispatch rule as `dot_product_attention` (`None`: the flash kernel on TPU/GPU, xla on CPU).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import dispatch, validation
from jaxattn.dot_product import api

OP = "dot_product_attention_backward"


def _load_reference():
    return _reference_backward


def _load_xla():
    from jaxattn.dot_product.xla import attention_blocked_backward

    def backward(*args, scale, spec, want_dbias):
        del want_dbias  # the blocked backward returns dbias whenever there is a bias
        return attention_blocked_backward(*args, scale=scale, spec=spec)
    return backward


def _load_pallas():
    from jaxattn.dot_product.kernel_backward import pallas_backward
    return pallas_backward


def _load_triton():
    from jaxattn.dot_product.kernel_backward import triton_backward
    return triton_backward


dispatch.register(OP, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
dispatch.register(OP, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))
dispatch.register(OP, dispatch.Backend("pallas", _load_pallas, platforms=("tpu", "gpu"), priority=1,
                                       supports=api._flash_supports))
dispatch.register(OP, dispatch.Backend("triton", _load_triton, platforms=("gpu",), priority=2,
                                       supports=api._triton_supports))


def dot_product_attention_backward(query, key, value, out, lse, d_out, *, bias=None, mask=None, scale=None,
                                   is_causal=False, local_window_size=None, query_segment_ids=None,
                                   key_segment_ids=None, d_lse=None, implementation=None):
    """Gradients `(dq, dk, dv)` (plus `dbias` when `bias` is given) of `dot_product_attention`.

    Args:
      query, key, value, bias, mask, scale, is_causal, local_window_size, query_segment_ids, key_segment_ids,
        implementation: as in `dot_product_attention` (same checks, same backends).
      out: `[B, T, N, Hv]`, any float dtype (fp32 keeps `delta` exact).
      lse: `[B, N, T]` fp32 log-sum-exp of the masked, scaled logits (`-inf` for a row that sees no key).
      d_out: cotangent of `out`, `[B, T, N, Hv]`.
      d_lse: optional cotangent of `lse`, `[B, N, T]`.

    The backward uses `p = exp(s - lse)` and `ds = p * (dp - delta)` with `dp = d_out v^T` and
    `delta = rowsum(d_out * out) - d_lse`. With the `out`/`lse` this op returned for these very keys that is
    its exact VJP. With the GLOBAL `out`/`lse` of a softmax merged over several key blocks (ring attention) it
    is exactly that block's share of the merged result's gradient: `dk`, `dv` of the block and its
    contribution to `dq` (sum those over the blocks). 'reference' evaluates the same formula with the
    `T x S` logits materialised.

    Returns:
      `(dq, dk, dv)` in the dtypes of query/key/value, or `(dq, dk, dv, dbias)` shaped like `bias`.
    """
    spec, scale = api._validate(query, key, value, bias, mask, scale, is_causal, local_window_size,
                                query_segment_ids, key_segment_ids)
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
    impl = dispatch.resolve(OP, implementation, query=query, key=key, value=value, bias=bias, mask=mask,
                            spec=spec, segment_ids=query_segment_ids is not None)
    dq, dk, dv, dbias = impl(query, key, value, bias, mask, query_segment_ids, key_segment_ids, out,
                             jnp.asarray(lse, jnp.float32), d_out,
                             None if d_lse is None else jnp.asarray(d_lse, jnp.float32),
                             scale=scale, spec=spec, want_dbias=bias is not None)
    return (dq, dk, dv) if bias is None else (dq, dk, dv, dbias)


def _reference_backward(*args, scale, spec, want_dbias):
    from jaxattn.dot_product.reference import attention_backward_reference

    del want_dbias
    return attention_backward_reference(*args, scale=scale, spec=spec)
