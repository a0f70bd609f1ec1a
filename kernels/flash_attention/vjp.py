"""The custom VJP shared by the Pallas and the Triton flash attention.

`flash_vjp(forward, backward)` builds `f(q, k, v, bias, q_seg, k_seg, static) -> (out, lse)` whose backward:
- knows (through `symbolic_zeros`) whether the bias is differentiated at all, and asks for the `[B, N, T, S]`
  dlogits only then (a constant mask-like bias costs nothing extra);
- treats an unused `lse` (or `out`) cotangent as a symbolic zero instead of a buffer of zeros;
- sums the dlogits over the bias's broadcast axes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def reduce_to(x, shape):
    """Sums `x` over the axes where `shape` has 1 (the broadcast axes of a bias), keeping dims."""
    axes = tuple(a for a, (have, want) in enumerate(zip(x.shape, shape)) if want == 1 and have > 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def flash_vjp(forward: Callable, backward: Callable) -> Callable:
    """forward(q, k, v, bias, q_seg, k_seg, static) -> (out, lse);
    backward(static, q, k, v, bias, q_seg, k_seg, out, lse, d_out, d_lse or None, want_dbias)
      -> (dq, dk, dv, dlogits or None), dlogits of the bias's rank with full (unbroadcast) axes."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def attention(q, k, v, bias, q_seg, k_seg, static):
        return forward(q, k, v, bias, q_seg, k_seg, static)

    def attention_fwd(q, k, v, bias, q_seg, k_seg, static):
        wants_dbias = bias is not None and bias.perturbed
        q, k, v, bias, q_seg, k_seg = (None if x is None else x.value for x in (q, k, v, bias, q_seg, k_seg))
        out, lse = forward(q, k, v, bias, q_seg, k_seg, static)
        # `()` vs None is pytree structure, hence static: the backward needs no traced flag.
        return (out, lse), (q, k, v, bias, q_seg, k_seg, out, lse, () if wants_dbias else None)

    def attention_bwd(static, residuals, cotangents):
        q, k, v, bias, q_seg, k_seg, out, lse, wants_dbias = residuals
        d_out, d_lse = cotangents
        if isinstance(d_out, SymbolicZero):
            d_out = jnp.zeros(out.shape, out.dtype)
        d_lse = None if isinstance(d_lse, SymbolicZero) else d_lse
        dq, dk, dv, dlogits = backward(static, q, k, v, bias, q_seg, k_seg, out, lse, d_out, d_lse,
                                       wants_dbias is not None)
        dbias = None if dlogits is None else reduce_to(dlogits, bias.shape).astype(bias.dtype)
        return dq, dk, dv, dbias, None, None

    attention.defvjp(attention_fwd, attention_bwd, symbolic_zeros=True)
    return attention


def dot_product_backend(flash_attention: Callable, kernel_name: str) -> Callable:
    """Adapts a kernel's `flash_attention(q, k, v, bias, *, q_segment_ids, k_segment_ids, scale, is_causal, window,
    causal_offset)` to the `dot_product_attention` backend signature (`spec`: is_causal, window, causal_offset)."""

    def attention(query, key, value, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec):
        if mask is not None:
            raise ValueError(f"the {kernel_name} flash-attention kernel does not take a boolean `mask`; use `bias` "
                             "or implementation='xla'")
        return flash_attention(query, key, value, bias, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                               scale=scale, is_causal=spec.is_causal, window=spec.window,
                               causal_offset=spec.causal_offset)

    attention.__doc__ = f"The `dot_product_attention` backend of the {kernel_name} flash-attention kernel."
    return attention


def check_segment_ids(q_segment_ids, k_segment_ids):
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("give both `q_segment_ids` and `k_segment_ids`, or neither")
