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


def sink_gradient(sinks, lse, delta, axis):
    """`d sink = -sum p_sink * delta` over `axis`, `p_sink = exp(sink - lse)` with the lse that includes the sink
    and `delta = rowsum(d_out * out) - d_lse` (rows that see nothing, sink -inf included, add 0)."""
    p_sink = jnp.exp(sinks.astype(jnp.float32) - jnp.where(jnp.isfinite(lse), lse, 0.0))
    return -jnp.sum(p_sink * delta, axis=axis, keepdims=True)


def check_features(query, key, *, sinks, kv_lengths, block_mask, block_shape, window):
    """ValueErrors naming the argument and the shapes for the kernels' optional features."""
    b, t, n = query.shape[:3]
    s = key.shape[1]
    if sinks is not None and tuple(sinks.shape) != (n,):
        raise ValueError(f"`sinks` must be [num_heads] = [{n}] (one logit per query head), got {tuple(sinks.shape)}")
    if kv_lengths is not None and (tuple(kv_lengths.shape) != (b,) or not jnp.issubdtype(kv_lengths.dtype,
                                                                                           jnp.integer)):
        raise ValueError(f"`kv_lengths` must be an integer [batch] = [{b}] array, got {kv_lengths.dtype}"
                         f"{list(kv_lengths.shape)}")
    if (block_mask is None) != (block_shape is None):
        raise ValueError("give both `block_mask` and `block_shape`, or neither")
    if block_mask is not None:
        bq, bk = block_shape
        grid = (-(-t // bq), -(-s // bk))
        if (block_mask.ndim != 4 or block_mask.shape[0] not in (1, b) or block_mask.shape[1] not in (1, n)
                or tuple(block_mask.shape[2:]) != grid or block_mask.dtype != jnp.bool_):
            raise ValueError(f"`block_mask` must be bool [1|{b}, 1|{n}, {grid[0]}, {grid[1]}] for q_len {t}, kv_len "
                             f"{s} and block_shape {tuple(block_shape)}, got {block_mask.dtype}"
                             f"{list(block_mask.shape)}")
    if window is not None and not isinstance(window, int) and len(window) and not isinstance(window[0], int):
        if len(window) != n:
            raise ValueError(f"a per-head `window` needs one (left, right) pair per query head: got {len(window)} "
                             f"for {n} heads")
