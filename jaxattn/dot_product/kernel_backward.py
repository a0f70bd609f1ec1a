"""`dot_product_attention_backward` backends of the flash-attention kernels (loaded lazily by `backward.py`).

Each adapter calls its kernel module's public `flash_attention_backward` (the backward its `custom_vjp` runs), so
no forward kernel is launched: `p = exp(s - lse)` is recomputed per tile from
the given `lse`; `delta = rowsum(d_out * out) - d_lse` is the given one (the op computes it once), else the
kernel computes it from the given `out`.
"""
from __future__ import annotations


def _bias_grad(dlogits, bias, t, s):
    """Kernel dlogits `[b, n, >= t, >= s]` (bias broadcast along T/S materialised) -> the bias's own shape."""
    from jaxattn.kernels.flash_attention.vjp import reduce_to
    b4 = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    return reduce_to(dlogits[:, :, :t, :s], b4.shape).reshape(bias.shape).astype(bias.dtype)


def pallas_backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse, d_out, d_lse, *,
                    scale, spec, want_dbias, kv_lengths=None, block_mask=None, target=None, delta=None):
    """The Pallas flash backward kernels, for `target` (dispatch passes the lowering platform's)."""
    from jaxattn.kernels.flash_attention import pallas
    return _run(pallas.flash_attention_backward, "Pallas", **locals())


def triton_backward(query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse, d_out, d_lse, *,
                    scale, spec, want_dbias, kv_lengths=None, block_mask=None, delta=None):
    """The Triton flash backward kernels, on the heads-last arrays in place."""
    from jaxattn.kernels.flash_attention import triton
    return _run(triton.flash_attention_backward, "Triton", **locals())


def _run(kernel_backward, kernel_name, *, query, key, value, bias, mask, q_segment_ids, k_segment_ids, out, lse,
         d_out, d_lse, scale, spec, want_dbias, kv_lengths=None, block_mask=None, target=None, delta=None, **_):
    _no_mask(mask, kernel_name)
    dq, dk, dv, dlogits = kernel_backward(
        query, key, value, out, lse, d_out, bias, d_lse=d_lse, delta=delta, q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids, scale=scale, is_causal=spec.is_causal,
        window=spec.window if spec.head_windows is None else spec.head_windows, causal_offset=spec.causal_offset,
        logits_soft_cap=spec.logits_soft_cap, kv_lengths=kv_lengths, block_mask=block_mask,
        block_shape=spec.block_shape, want_dbias=want_dbias, **({} if target is None else {"target": target}))
    dbias = None if dlogits is None else _bias_grad(dlogits, bias, query.shape[1], key.shape[1])
    return dq, dk, dv, dbias


def _no_mask(mask, kernel):
    if mask is not None:
        raise ValueError(f"the {kernel} flash-attention backward does not take a boolean `mask`; use `bias` or "
                         "implementation='xla'")
