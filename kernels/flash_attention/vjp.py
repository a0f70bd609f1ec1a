"""The custom VJP shared by the Pallas and the Triton flash attention.

`flash_vjp(forward, backward)` builds `f(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static) -> (out, lse)`
(`sinks`: the per-head sink logits in the kernel's layout or None, differentiable; `dynamic`: `(kv_lengths,
block_mask)` or None, integer/boolean operands of the mask, never differentiated) whose backward:
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

from jaxattn.core import block_sparse


def reduce_to(x, shape):
    """Sums `x` over the axes where `shape` has 1 (the broadcast axes of a bias), keeping dims."""
    axes = tuple(a for a, (have, want) in enumerate(zip(x.shape, shape)) if want == 1 and have > 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def flash_vjp(forward: Callable, backward: Callable) -> Callable:
    """forward(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static) -> (out, lse);
    backward(static, q, k, v, bias, q_seg, k_seg, sinks, dynamic, out, lse, d_out, d_lse or None, want_dbias)
      -> (dq, dk, dv, dlogits or None, dsinks or None), dlogits of the bias's rank with full (unbroadcast) axes,
      dsinks shaped like `sinks`."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
    def attention(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static):
        return forward(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static)

    def attention_fwd(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static):
        wants_dbias = bias is not None and bias.perturbed
        q, k, v, bias, q_seg, k_seg, sinks = (None if x is None else x.value
                                              for x in (q, k, v, bias, q_seg, k_seg, sinks))
        dynamic = jax.tree.map(lambda x: x.value, dynamic)
        out, lse = forward(q, k, v, bias, q_seg, k_seg, sinks, dynamic, static)
        # `()` vs None is pytree structure, hence static: the backward needs no traced flag.
        return (out, lse), (q, k, v, bias, q_seg, k_seg, sinks, dynamic, out, lse, () if wants_dbias else None)

    def attention_bwd(static, residuals, cotangents):
        q, k, v, bias, q_seg, k_seg, sinks, dynamic, out, lse, wants_dbias = residuals
        d_out, d_lse = cotangents
        if isinstance(d_out, SymbolicZero):
            d_out = jnp.zeros(out.shape, out.dtype)
        d_lse = None if isinstance(d_lse, SymbolicZero) else d_lse
        dq, dk, dv, dlogits, dsinks = backward(static, q, k, v, bias, q_seg, k_seg, sinks, dynamic, out, lse, d_out,
                                               d_lse, wants_dbias is not None)
        dbias = None if dlogits is None else reduce_to(dlogits, bias.shape).astype(bias.dtype)
        dsinks = None if sinks is None else dsinks.astype(sinks.dtype)
        return dq, dk, dv, dbias, None, None, dsinks, jax.tree.map(lambda _: None, dynamic)

    attention.defvjp(attention_fwd, attention_bwd, symbolic_zeros=True)
    return attention


def dot_product_backend(flash_attention: Callable, kernel_name: str) -> Callable:
    """Adapts a kernel's `flash_attention(q, k, v, bias, *, q_segment_ids, k_segment_ids, scale, is_causal, window,
    causal_offset, sinks, logits_soft_cap, kv_lengths, block_mask, block_shape)` to the `dot_product_attention`
    backend signature (`spec`: is_causal, window, causal_offset and, where the op has them, head_windows,
    logits_soft_cap, block_shape; the arrays `sinks`, `kv_lengths`, `block_mask` as keyword arguments)."""

    def attention(query, key, value, bias, mask, q_segment_ids, k_segment_ids, *, scale, spec, sinks=None,
                  kv_lengths=None, block_mask=None, target=None):
        if mask is not None:
            raise ValueError(f"the {kernel_name} flash-attention kernel does not take a boolean `mask`; use `bias` "
                             "or implementation='xla'")
        head_windows = getattr(spec, "head_windows", None)
        return flash_attention(query, key, value, bias, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                               scale=scale, is_causal=spec.is_causal,
                               window=spec.window if head_windows is None else head_windows,
                               causal_offset=spec.causal_offset, sinks=sinks,
                               logits_soft_cap=getattr(spec, "logits_soft_cap", None), kv_lengths=kv_lengths,
                               block_mask=block_mask, block_shape=getattr(spec, "block_shape", None),
                               **({} if target is None else {"target": target}))

    attention.__doc__ = f"The `dot_product_attention` backend of the {kernel_name} flash-attention kernel."
    return attention


def check_segment_ids(q_segment_ids, k_segment_ids):
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("give both `q_segment_ids` and `k_segment_ids`, or neither")


def check_features(query, key, *, sinks, kv_lengths, block_mask, block_shape):
    """ValueErrors naming the argument and the shapes for the kernels' array features (per-head windows are
    checked by `masks.per_head_windows`, the cap by `tile.Problem.of`)."""
    b, t, n = query.shape[:3]
    if sinks is not None and tuple(sinks.shape) != (n,):
        raise ValueError(f"`sinks` must have shape ({n},) (one logit per query head), got {tuple(sinks.shape)}")
    if kv_lengths is not None and (tuple(kv_lengths.shape) != (b,) or not jnp.issubdtype(kv_lengths.dtype,
                                                                                           jnp.integer)):
        raise ValueError(f"`kv_lengths` must be an integer array of shape ({b},), got shape "
                         f"{tuple(kv_lengths.shape)} dtype {kv_lengths.dtype}")
    if block_mask is not None:
        block_sparse.check_block_mask(block_mask, block_shape, b, n, t, key.shape[1])
