"""Lightning attention (causal and bidirectional) and its gradient, built from one blocked scan primitive.

A *scan* is `scan(a, b, c, slopes, init, docs, static, *, reverse, want_state, out_dtype) -> (o, state | None)`:
  forward (reverse=False): `o_t = sum_{s<=t} lambda^(t-s) (a_t . b_s) c_s + lambda^(t+1) a_t init`,
                           state = `S_{T-1}` with `S_t = lambda S_{t-1} + b_t^T c_t`, `S_{-1} = init`;
  reverse (reverse=True):  `o_t = sum_{s>=t} lambda^(s-t) (a_t . b_s) c_s + lambda^(T-1-t) a_t init`,
                           state = `G_0` with `G_t = lambda G_{t+1} + b_t^T c_t`, `G_{T-1} = b^T c + init`;
with `a, b` `[.., T, .., Da]`, `c` `[.., T, .., Dc]`, `init`/state `[B, N, Da, Dc]` fp32, `lambda = exp(-slope)`
per head (1 when `slopes` is None). With document ids `docs` (None: one document) every `(t, s)` of different
documents is dropped, `init` reaches the document at its end of the sequence (the first forward, the last in
reverse) and the state is that of the document at the other end (`jaxattn.core.segments`). The Pallas and the
Triton kernels each provide one; everything here is independent of their layouts (features last, state
`[B, N, Da, Dc]`; `docs` in whatever layout the kernel's wrapper gives, passed through untouched).

With `S_t` the forward state and `G_t = dL/dS_t` (the reverse recurrence of `q_t^T dO_t`, started by the final
state's cotangent), the causal gradient is three scans:
  dq = forward(dO, V, K, init=S0^T)        (`dq_t = dO_t S_t^T`)
  dv = reverse(K, Q, dO, init=dSf)          (`dv_t = k_t G_t`; its state G_0 gives `dS0 = lambda G_0`)
  dk = reverse(V, dO, Q, init=dSf^T)        (`dk_t = v_t G_t^T`)
The bidirectional form `o_t = sum_s lambda^|t-s| (q_t . k_s) v_s` is forward + reverse - diagonal, and, being
symmetric in time, is its own gradient's building block. The document mask `[d_t == d_s]` is symmetric too, so
every scan of a gradient takes the same `docs`. The slopes and the document ids get no gradient (the op stops
it). The backward runs kernels, so these functions are differentiable once (no grad-of-grad).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

F32 = jnp.float32


def _swap(state):
    return None if state is None else jnp.swapaxes(state, -1, -2)


def _value(x):
    return None if x is None else x.value


def causal_lightning(scan: Callable) -> Callable:
    """`f(q, k, v, slopes, init, docs, static) -> (out in q.dtype, final_state fp32)` with a custom VJP over
    `scan`."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def lightning(q, k, v, slopes, init, docs, static):
        return scan(q, k, v, slopes, init, docs, static, reverse=False, want_state=True, out_dtype=q.dtype)

    def lightning_fwd(q, k, v, slopes, init, docs, static):
        wants_dinit = init is not None and init.perturbed
        q, k, v, slopes, init, docs = map(_value, (q, k, v, slopes, init, docs))
        outs = scan(q, k, v, slopes, init, docs, static, reverse=False, want_state=True, out_dtype=q.dtype)
        # `()` vs None is pytree structure, hence static in the backward.
        return outs, (q, k, v, slopes, init, docs, () if wants_dinit else None)

    def lightning_bwd(static, residuals, cotangents):
        q, k, v, slopes, init, docs, wants_dinit = residuals
        d_out, d_state = cotangents
        if isinstance(d_out, SymbolicZero):
            d_out = jnp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype)
        d_state = None if isinstance(d_state, SymbolicZero) else d_state.astype(F32)
        d_out = d_out.astype(q.dtype)
        common = dict(docs=docs, static=static, out_dtype=q.dtype)
        dq, _ = scan(d_out, v, k, slopes, _swap(init), reverse=False, want_state=False, **common)
        dv, g0 = scan(k, q, d_out, slopes, d_state, reverse=True, want_state=wants_dinit is not None, **common)
        dk, _ = scan(v, d_out, q, slopes, _swap(d_state), reverse=True, want_state=False, **common)
        d_init = None
        if wants_dinit is not None:
            d_init = g0 if slopes is None else g0 * jnp.exp(-slopes)[None, :, None, None]
            d_init = d_init.astype(init.dtype)
        return dq, dk, dv, None, d_init, None

    lightning.defvjp(lightning_fwd, lightning_bwd, symbolic_zeros=True)
    return lightning


def _diagonal(a, b, c):
    """`(a_t . b_t) c_t` in fp32: the `s == t` term that the forward and reverse scans both count."""
    return jnp.sum(a.astype(F32) * b.astype(F32), axis=-1, keepdims=True) * c.astype(F32)


def bidirectional_lightning(scan: Callable) -> Callable:
    """`f(q, k, v, slopes, docs, static) -> out` (q.dtype), `o_t = sum_s lambda^|t-s| (q_t . k_s) v_s` over the
    pairs of one document (any pair when `docs` is None; slopes or docs not None: `bidirectional_no_decay` is the
    form with neither)."""

    def both_ways(a, b, c, slopes, docs, static):
        kw = dict(docs=docs, static=static, want_state=False, out_dtype=F32)
        forward, _ = scan(a, b, c, slopes, None, reverse=False, **kw)
        backward, _ = scan(a, b, c, slopes, None, reverse=True, **kw)
        return (forward + backward - _diagonal(a, b, c)).astype(a.dtype)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def lightning(q, k, v, slopes, docs, static):
        return both_ways(q, k, v, slopes, docs, static)

    def lightning_fwd(q, k, v, slopes, docs, static):
        return both_ways(q, k, v, slopes, docs, static), (q, k, v, slopes, docs)

    def lightning_bwd(static, residuals, d_out):
        q, k, v, slopes, docs = residuals
        d_out = d_out.astype(q.dtype)
        # The weights lambda^|t-s| [d_t == d_s] are symmetric, so each gradient is the same operator on other
        # operands.
        return (both_ways(d_out, v, k, slopes, docs, static), both_ways(v, d_out, q, slopes, docs, static),
                both_ways(k, q, d_out, slopes, docs, static), None, None)

    lightning.defvjp(lightning_fwd, lightning_bwd)
    return lightning


def bidirectional_no_decay(query, key, value):
    """Without decay the bidirectional form is `q (K^T V)`: linear in T with no blocking, left to XLA (heads-last
    `[B, T, N, H]` inputs; fp32 accumulation, output in the query dtype)."""
    kv = jnp.einsum("bsnh,bsne->bnhe", key, value, preferred_element_type=F32)
    return jnp.einsum("btnh,bnhe->btne", query.astype(F32), kv).astype(query.dtype)
