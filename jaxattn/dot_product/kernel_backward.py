"""`dot_product_attention_backward` backends of the flash-attention kernels (loaded lazily by `backward.py`).

Each adapter converts the op's heads-last arrays to its kernel's layout and calls the kernel's own backward (the
function its `custom_vjp` runs), so no forward kernel is launched: `p = exp(s - lse)` is recomputed per tile from
the given `lse`, and `delta = rowsum(d_out * out) - d_lse` from the given `out`.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import blocking


def _bias_grad(dlogits, bias, t, s):
    """Kernel dlogits `[b, n, >= t, >= s]` (bias broadcast along T/S materialised) -> the bias's own shape."""
    from jaxattn.kernels.flash_attention.vjp import reduce_to
    b4 = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    return reduce_to(dlogits[:, :, :t, :s], b4.shape).reshape(bias.shape).astype(bias.dtype)


def _seg(ids, length, axis):
    """Segment ids as the Pallas kernels take them: int32, padded with -1, a unit axis at `axis`."""
    return jnp.expand_dims(blocking.pad_axis(ids.astype(jnp.int32), 1, length, -1), axis)


def pallas_backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse, d_out, d_lse, *,
                    scale, spec, want_dbias):
    """The Pallas flash backward (`pallas._backward`): target from the platform ('interpret' on CPU)."""
    from jaxattn.kernels.common import blocks as common_blocks
    from jaxattn.kernels.common import platform
    from jaxattn.kernels.flash_attention import blocks, pallas
    from jaxattn.kernels.flash_attention.tile import Problem

    _no_mask(mask, "Pallas")
    target = platform.resolve_target(None)
    mode = "grid" if platform.tpu_like(target) else "fori"
    b, t, n, h = query.shape
    s, hv = key.shape[1], value.shape[-1]
    problem = Problem.of(t, s, h, scale=scale, is_causal=spec.is_causal, window=spec.window,
                         causal_offset=spec.causal_offset)
    static = pallas._Static(problem, blocks.fit(target, t, s, None), target, mode)
    tp, sp = blocks.padded_lengths(static.sizes, t, s)
    hp, hvp = common_blocks.feature_dim(h, target), common_blocks.feature_dim(hv, target)
    layout = pallas._kernel_layout
    q, k, v = layout(query, tp, hp), layout(key, sp, hp), layout(value, sp, hvp)
    o, do = layout(out, tp, hvp), layout(d_out.astype(query.dtype), tp, hvp)
    rows = lambda x: blocking.pad_axis(x.astype(jnp.float32), 2, tp)[..., None]  # noqa: E731  [B, N, Tp, 1]
    bias_k = None
    if bias is not None:
        b4 = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        b4 = jnp.broadcast_to(b4, (*b4.shape[:2], t, s))
        bias_k = blocking.pad_axis(blocking.pad_axis(b4, 2, tp), 3, sp)
    q_seg = k_seg = None
    if q_segment_ids is not None:
        q_seg, k_seg = _seg(q_segment_ids, tp, 2), _seg(k_segment_ids, sp, 1)
    dq, dk, dv, dlogits = pallas._backward(static, q, k, v, bias_k, q_seg, k_seg, o, rows(lse), do,
                                           None if d_lse is None else rows(d_lse), want_dbias)
    back = lambda x, length, dim: jnp.swapaxes(x, 1, 2)[:, :length, :, :dim]  # noqa: E731
    dbias = None if dlogits is None else _bias_grad(dlogits, bias, t, s)
    return back(dq, t, h), back(dk, s, h), back(dv, s, hv), dbias


def triton_backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse, d_out, d_lse, *,
                    scale, spec, want_dbias):
    """The Triton flash backward (`triton._backward`), on the heads-last arrays in place."""
    from jaxattn.kernels.flash_attention import triton
    from jaxattn.kernels.flash_attention.tile import Problem

    _no_mask(mask, "Triton")
    t, s = query.shape[1], key.shape[1]
    problem = Problem.of(t, s, query.shape[3], scale=scale, is_causal=spec.is_causal, window=spec.window,
                         causal_offset=spec.causal_offset)
    b4 = None if bias is None else bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    seg = lambda x: None if x is None else x.astype(jnp.int32)  # noqa: E731
    dq, dk, dv, ds = triton._backward(
        triton._Static(problem), query, key, value, b4, seg(q_segment_ids), seg(k_segment_ids), out,
        lse.astype(jnp.float32), d_out.astype(query.dtype), d_lse, want_dbias)
    return dq, dk, dv, (None if ds is None else _bias_grad(ds, bias, t, s))


def _no_mask(mask, kernel):
    if mask is not None:
        raise ValueError(f"the {kernel} flash-attention backward does not take a boolean `mask`; use `bias` or "
                         "implementation='xla'")
