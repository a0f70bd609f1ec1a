"""Public entry point of dot-product attention: validation and backend dispatch."""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import dispatch, masks, validation
from jaxattn.dot_product import common
from jaxattn.dot_product import features as op_features

OP = "dot_product_attention"
LAYOUT_Q = "[batch, q_len, num_heads, head_dim]"
LAYOUT_KV = "[batch, kv_len, num_kv_heads, head_dim]"


def _load_reference():
    from jaxattn.dot_product.reference import attention_reference
    return op_features.tagged("reference", attention_reference)


def _load_xla():
    from jaxattn.dot_product.xla import attention_blocked
    return op_features.tagged("xla", attention_blocked)


def _load_pallas():
    from jaxattn.kernels.flash_attention.pallas import attention
    return op_features.tagged("pallas", attention)


def _load_triton():
    from jaxattn.kernels.flash_attention.triton import attention
    return op_features.tagged("triton", attention)


def flash_supports(mask=None, features=frozenset(), **_):
    """Needs no boolean `mask` (give a bias) and only the features in `features.NATIVE['pallas']`. The flash
    kernels take everything else; None then falls back to xla."""
    return mask is None and features <= op_features.NATIVE["pallas"]


def triton_supports(mask=None, query=None, features=frozenset(), **_):
    """Needs jax-triton (the `gpu` extra), no boolean `mask`, and a head of <= 256 features (kept in registers)."""
    return (mask is None and features <= op_features.NATIVE["triton"] and query.shape[-1] <= 256
            and dispatch.module_available("jax_triton"))


dispatch.register(OP, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
dispatch.register(OP, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))
dispatch.register(OP, dispatch.Backend("pallas", _load_pallas, platforms=("tpu", "gpu"), priority=1,
                                       supports=flash_supports, takes_target=True))
dispatch.register(OP, dispatch.Backend("triton", _load_triton, platforms=("gpu",), priority=2,
                                       supports=triton_supports, runs_on=("gpu",)))


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          local_window_size=None, query_segment_ids=None, key_segment_ids=None,
                          return_lse=False, sinks=None, logits_soft_cap=None, kv_lengths=None, block_mask=None,
                          block_shape=None, bias_factors=None, implementation=None):
    """Softmax attention `softmax(q k^T * scale + bias, masked) v`, heads-last, with GQA/MQA.

    Args:
      query: `[B, T, N, H]`.
      key: `[B, S, K, H]` with `N % K == 0` (K < N is grouped-query attention; k/v are never repeated).
      value: `[B, S, K, Hv]`.
      bias: optional additive logits, broadcastable to `[B, N, T, S]`; differentiable.
      mask: optional boolean, broadcastable to `[B, N, T, S]`; True keeps a key.
      scale: logit scale, default `H ** -0.5`.
      is_causal: query `i` sees keys `j <= i + (S - T)`. Aligned bottom-right when `T != S` (FlashAttention
        >= 2.1, the KV-cache decoding convention); `jax.nn.dot_product_attention` aligns top-left instead.
      local_window_size: `w` or `(left, right)`: query `i` sees keys with `-left <= j - (i + S - T) <= right`.
        Same convention as `jax.nn.dot_product_attention` when `T == S`. Or a sequence of `N` entries, one
        `(left, right)` per query head (MoA / S2-Attention), None for a global head.
      query_segment_ids, key_segment_ids: integer `[B, T]` and `[B, S]`; a query sees only keys of its segment
        (packed sequences). Give both or neither.
      return_lse: also return the fp32 log-sum-exp of the masked, scaled logits, `[B, N, T]` (sink included).
      sinks: `[N]` float, one learnable logit per query head in the softmax denominator (GPT-OSS): a key with
        no value, so rows sum to less than one; differentiable.
      logits_soft_cap: positive float `cap`: `s <- cap * tanh(s / cap)` on the scaled logits, before `bias` and
        the masks (Gemma 2).
      kv_lengths: int `[B]`, valid keys per row of a padded KV cache: keys `j >= kv_lengths[b]` are masked and the
        `T` queries are the last `T` positions of the row (query `i` sits at `kv_lengths[b] - T + i` for
        `is_causal` and the window).
      block_mask, block_shape: boolean `[B|1, N|1, ceil(T/bq), ceil(S/bk)]` with `block_shape=(bq, bk)`: query
        `i` sees key `j` only if `block_mask[b, n, i // bq, j // bk]`. The xla path computes only the True
        blocks (without a dense `bias`/`mask`; with one it masks per block instead).
      bias_factors: `(u [B, T, N, R], w [B, S, N or K, R])`, the additive low-rank bias `u . w` (FlashBias),
        never materialised: every backend but 'reference' gets the head dim extended to `[q, u / scale]` and
        `[k, w]` (with `w` per query head and `K < N`, the keys and values are repeated per query head). Not
        combinable with `logits_soft_cap` (the cap applies before the bias). Gradients reach `u` and `w`.
      implementation: 'reference' (materialises `T x S` logits), 'xla' (blocked online softmax, memory
        O(T * block)), 'pallas' (the flash kernels: Mosaic on TPU, Pallas-Triton on GPU, the interpreter on CPU),
        'triton' (jax-triton, GPU only), or None: the best for the platform the program is lowered for (the
        kernels on TPU and GPU where they take the arguments, 'xla' otherwise; `jaxattn.explain` says which).

    Returns:
      `out [B, T, N, Hv]` in the query dtype, or `(out, lse)`. A query that sees no key gets output 0 and
      lse `-inf` (never NaN).
    """
    spec, scale = _validate(query, key, value, bias, mask, scale, is_causal, local_window_size,
                            query_segment_ids, key_segment_ids, logits_soft_cap=logits_soft_cap,
                            block_mask=block_mask, block_shape=block_shape)
    extras = op_features.validate(query, key, value, spec, sinks=sinks, kv_lengths=kv_lengths,
                                  block_mask=block_mask, bias_factors=bias_factors)
    call = op_features.prepare(query, key, value, scale, extras)
    def run(impl):
        q, k, v, kwargs = op_features.for_backend(call, impl, query, key, value)
        out, lse = impl(q, k, v, bias, mask, query_segment_ids, key_segment_ids, scale=scale, spec=spec, **kwargs)
        return op_features.finish(out, lse, impl, call)

    out, lse = dispatch.call(OP, implementation, run, query=call.query, key=call.key, value=call.value, bias=bias,
                             mask=mask, spec=spec, segment_ids=query_segment_ids is not None,
                             features=op_features.used(spec, extras))
    return (out, lse) if return_lse else out


def _validate(query, key, value, bias, mask, scale, is_causal, local_window_size, q_seg, k_seg, *,
              logits_soft_cap=None, block_mask=None, block_shape=None):
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    validation.check_rank("query", query, 4, LAYOUT_Q)
    validation.check_rank("key", key, 4, LAYOUT_KV)
    validation.check_rank("value", value, 4, LAYOUT_KV)
    for name, x in (("query", query), ("key", key), ("value", value)):
        validation.check_floating(name, x)
    validation.check_same_dtype(query=query, key=key, value=value)
    validation.check_dim("key", key, 0, query.shape[0], "batch size", "`query`")
    validation.check_dim("value", value, 0, query.shape[0], "batch size", "`query`")
    validation.check_dim("key", key, -1, query.shape[-1], "head_dim", "`query`")
    validation.check_dim("value", value, 1, key.shape[1], "kv_len", "`key`")
    validation.check_dim("value", value, 2, key.shape[2], "num_kv_heads", "`key`")
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    if k == 0 or n % k:
        raise ValueError(f"`query` heads ({n}) must be a multiple of `key`/`value` heads ({k}); "
                         f"shapes {tuple(query.shape)} and {tuple(key.shape)}")
    target = (b, n, t, s)
    if bias is not None:
        validation.check_broadcastable("bias", bias, target, "[B, N, T, S]")
        validation.check_floating("bias", bias)
    if mask is not None:
        validation.check_broadcastable("mask", mask, target, "[B, N, T, S]")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"`mask` must be boolean (True keeps a key), got dtype {mask.dtype}")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("give both `query_segment_ids` and `key_segment_ids`, or neither")
    if q_seg is not None:
        for name, ids, want in (("query_segment_ids", q_seg, (b, t)), ("key_segment_ids", k_seg, (b, s))):
            if tuple(ids.shape) != want:
                raise ValueError(f"`{name}` must have shape {want} ([batch, length]), got {tuple(ids.shape)}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"`{name}` must be integer, got dtype {ids.dtype}")
    window, head_windows = _check_window(local_window_size, n, t, s)
    if scale is None:
        scale = h ** -0.5
    spec = common.MaskSpec(is_causal=bool(is_causal), window=window, causal_offset=s - t, head_windows=head_windows,
                           logits_soft_cap=op_features.check_soft_cap(logits_soft_cap),
                           block_shape=op_features.check_block_shape(block_mask, block_shape))
    return spec, float(scale)


def _check_window(local_window_size, num_heads, q_len, kv_len):
    """-> `(window, head_windows)`: one of them set (or neither)."""
    if local_window_size is None:
        return None, None
    if isinstance(local_window_size, (tuple, list)) and any(
            w is None or isinstance(w, (tuple, list)) for w in local_window_size):
        return None, masks.per_head_windows(local_window_size, num_heads, q_len, kv_len)
    ok = isinstance(local_window_size, int) or (
        isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
        and all(isinstance(w, int) for w in local_window_size))
    window = masks.normalize_window(local_window_size) if ok else None
    if window is None or min(window) < 0:
        raise ValueError(f"`local_window_size` must be a non-negative int, a (left, right) pair of non-negative "
                         f"ints or one such pair per query head, got {local_window_size!r}")
    return window, None
