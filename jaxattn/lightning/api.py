"""Public entry points of lightning attention: validation, backend dispatch and the one-token decoding step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import dispatch, segments, validation

OP = "lightning_attention"
LAYOUT_QK = "[batch, length, num_heads, head_dim]"
LAYOUT_V = "[batch, length, num_heads, head_dim_v]"
LAYOUT_STATE = "[batch, num_heads, head_dim, head_dim_v]"


def _load_reference():
    from jaxattn.lightning.reference import lightning_reference
    return lightning_reference


def _load_xla():
    from jaxattn.lightning.xla import lightning_chunked
    return lightning_chunked


def _load_pallas():
    from jaxattn.kernels.lightning_attention.pallas import attention
    return attention


def _load_triton():
    from jaxattn.kernels.lightning_attention.triton import attention
    return attention


def _triton_supports(query=None, value=None, **_):
    """Needs jax-triton (the `gpu` extra) and heads of <= 256 features (a `[H, <= 32]` fp32 state tile and
    `[64, H]` operand tiles stay in registers)."""
    return max(query.shape[-1], value.shape[-1]) <= 256 and dispatch.module_available("jax_triton")


dispatch.register(OP, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
dispatch.register(OP, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))
dispatch.register(OP, dispatch.Backend("pallas", _load_pallas, platforms=("tpu", "gpu"), priority=1,
                                       takes_target=True))
dispatch.register(OP, dispatch.Backend("triton", _load_triton, platforms=("gpu",), priority=2,
                                       supports=_triton_supports, runs_on=("gpu",)))


def lightning_attention(query, key, value, *, slopes=None, is_causal=True, block_size=64, initial_state=None,
                        return_state=False, segment_ids=None, implementation=None):
    """Lightning attention (TransNormerLLM): linear attention with per-head exponential decay.

    No softmax, no scale, no normaliser. With `lambda_n = exp(-slopes[n])` (1 when `slopes` is None):
      causal:     `o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S0`
      non-causal: `o_t = sum_s lambda^|t-s| (q_t . k_s) v_s`   (symmetric decay in both directions)
    The state after token `t` is `S_t = sum_{s<=t} lambda^(t-s) k_s^T v_s + lambda^(t+1) S0`, so `o_t = q_t S_t`
    and `S_t = lambda S_{t-1} + k_t^T v_t`: exactly `lightning_attention_step`. Splitting a sequence and passing
    the first part's final state as the second part's `initial_state` gives the same outputs as one call.

    Args:
      query, key: `[B, T, N, H]` (any `T >= 0`, any `H`).
      value: `[B, T, N, Hv]`; one floating dtype for all three.
      slopes: `[N]` decay rates (`lightning_slopes`), non-negative; None for no decay. Treated as constants: no
        gradient flows to them (they are fixed buffers in TransNormerLLM).
      is_causal: causal (the language-model form) or bidirectional.
      block_size: positive int, the chunk length of the 'xla' path (clamped to `T`; any `T` works).
      initial_state: `[B, N, H, Hv]` state before token 0 (any float dtype, used in fp32); causal only, since a
        bidirectional output has no prefix state. Differentiable.
      return_state: also return the final state `S_{T-1}` `[B, N, H, Hv]` in fp32; causal only. Differentiable.
      segment_ids: integer `[B, T]` for packed documents, or None (one document). A document is a maximal run of
        equal ids (an id recurring after another starts a new document). Every pair of tokens of different
        documents is dropped, in both forms: each document's output equals running it alone. The initial state
        continues the first document (`S0` reaches tokens of the run that token 0 starts) and the final state is
        the last document's. No gradient.
      implementation: 'reference' (naive `T x T` decay matrix), 'xla' (loop over blocks, state in fp32, memory
        O(T * block) forward and backward through a `custom_vjp`: reverse mode only, grad-of-grad included),
        or None for the best available.

    Returns:
      `out [B, T, N, Hv]` in the input dtype (accumulated in fp32), or `(out, final_state)`.
    """
    query, key, value, slopes, initial_state = _validate(query, key, value, slopes, is_causal, block_size,
                                                         initial_state, return_state)
    segment_ids = segments.check_segment_ids(segment_ids, query.shape[0], query.shape[1])
    if query.shape[1] == 0:
        dispatch.plan(OP, implementation, query=query, key=key, value=value, is_causal=bool(is_causal))  # checks it
        return _empty(query, key, value, initial_state, return_state)
    kwargs = {} if segment_ids is None else {"segment_ids": jax.lax.stop_gradient(segment_ids)}

    def run(impl):
        return impl(query, key, value, slopes, initial_state, is_causal=bool(is_causal), block_size=int(block_size),
                    **kwargs)

    out, state = dispatch.call(OP, implementation, run, query=query, key=key, value=value, is_causal=bool(is_causal))
    return (out, state) if return_state else out


def lightning_attention_step(query, key, value, state, *, slopes=None):
    """One decoding step: `S' = lambda S + k^T v`, `o = q S'` (the state convention of `lightning_attention`).

    Args:
      query, key: `[B, N, H]`; value: `[B, N, Hv]`; state: `[B, N, H, Hv]` (any float dtype, used in fp32);
      slopes: `[N]` or None, as in `lightning_attention` (no gradient).
    Returns:
      `(out [B, N, Hv] in the query dtype, new_state [B, N, H, Hv] fp32)`.
    """
    for name, x, layout in (("query", query, "[batch, num_heads, head_dim]"),
                            ("key", key, "[batch, num_heads, head_dim]"),
                            ("value", value, "[batch, num_heads, head_dim_v]"),
                            ("state", state, LAYOUT_STATE)):
        validation.check_rank(name, jnp.asarray(x), 4 if name == "state" else 3, layout)
    query, key, value, state = (jnp.asarray(x) for x in (query, key, value, state))
    _check_qkv(query, key, value, length_axis=None)
    b, n, h = query.shape
    _check_state("state", state, (b, n, h, value.shape[-1]))
    slopes = _check_slopes(slopes, n)
    s = state.astype(jnp.float32)
    if slopes is not None:
        s = s * jnp.exp(-slopes)[None, :, None, None]
    s = s + jnp.einsum("bnh,bne->bnhe", key.astype(jnp.float32), value.astype(jnp.float32))
    out = jnp.einsum("bnh,bnhe->bne", query.astype(jnp.float32), s)
    return out.astype(query.dtype), s


def _empty(query, key, value, initial_state, return_state):
    b, _, n, h = query.shape
    out = jnp.zeros(query.shape[:-1] + value.shape[-1:], query.dtype)
    if not return_state:
        return out
    state = jnp.zeros((b, n, h, value.shape[-1])) if initial_state is None else initial_state
    return out, state.astype(jnp.float32)


def _check_qkv(query, key, value, length_axis):
    for name, x in (("query", query), ("key", key), ("value", value)):
        validation.check_floating(name, x)
    validation.check_same_dtype(query=query, key=key, value=value)
    head_axis = query.ndim - 2
    for name, x in (("key", key), ("value", value)):
        validation.check_dim(name, x, 0, query.shape[0], "batch size", "`query`")
        validation.check_dim(name, x, head_axis, query.shape[head_axis], "num_heads", "`query`")
        if length_axis is not None:
            validation.check_dim(name, x, length_axis, query.shape[length_axis], "length", "`query`")
    validation.check_dim("key", key, -1, query.shape[-1], "head_dim", "`query`")


def _check_slopes(slopes, num_heads):
    if slopes is None:
        return None
    slopes = jnp.asarray(slopes)
    validation.check_floating("slopes", slopes)
    if slopes.shape != (num_heads,):
        raise ValueError(f"`slopes` must have shape [num_heads] = ({num_heads},), got {tuple(slopes.shape)}")
    if not isinstance(slopes, jax.core.Tracer) and bool(np.any(np.asarray(slopes) < 0)):  # concrete values only
        raise ValueError(f"`slopes` must be >= 0 (lambda = exp(-slope) <= 1), got {np.asarray(slopes)}")
    return jax.lax.stop_gradient(slopes.astype(jnp.float32))


def _check_state(name, state, want):
    validation.check_floating(name, state)
    if tuple(state.shape) != tuple(want):
        raise ValueError(f"`{name}` must have shape {LAYOUT_STATE} = {tuple(want)}, got {tuple(state.shape)}")


def _validate(query, key, value, slopes, is_causal, block_size, initial_state, return_state):
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    validation.check_rank("query", query, 4, LAYOUT_QK)
    validation.check_rank("key", key, 4, LAYOUT_QK)
    validation.check_rank("value", value, 4, LAYOUT_V)
    _check_qkv(query, key, value, length_axis=1)
    b, _, n, h = query.shape
    slopes = _check_slopes(slopes, n)
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
    if not is_causal and initial_state is not None:
        raise ValueError("`initial_state` needs is_causal=True: a bidirectional output has no prefix state "
                         f"(got initial_state of shape {tuple(jnp.shape(initial_state))})")
    if not is_causal and return_state:
        raise ValueError("`return_state=True` needs is_causal=True: a bidirectional output has no prefix state")
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
        validation.check_rank("initial_state", initial_state, 4, LAYOUT_STATE)
        _check_state("initial_state", initial_state, (b, n, h, value.shape[-1]))
    return query, key, value, slopes, initial_state
