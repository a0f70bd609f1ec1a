"""The issue-16 arguments of `dot_product_attention`: their checks, which backend handles which natively, and
the generic adapters that give every backend the rest.

Two features reach every backend without native support:
- `sinks`: the backend returns `(out, lse)` over the keys and `softmax.merge_sink` adds the sink to the
  denominator afterwards (autodiff through the merge gives `d sinks`, and the backend's VJP gets the cotangents
  of its own `out`/`lse`);
- `bias_factors` (FlashBias): the head dim is extended, `q' = [q, u / scale]`, `k' = [k, w]`, so
  `scale * q' . k' = scale * q . k + u . w`, and the backend's own gradients reach `u` and `w`.

The others (`logits_soft_cap`, per-head windows, `kv_lengths`, `block_mask`) change which logits exist and must
be handled inside the backend: `NATIVE` says, in one place, which backend handles which, and `implementation=None`
skips a backend that lacks a feature in use (asking for it by name is a ValueError from the dispatcher).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers

import jax.numpy as jnp

from jaxattn.core import block_sparse, softmax, validation

SINKS, SOFT_CAP, HEAD_WINDOWS, KV_LENGTHS, BLOCK_MASK, BIAS_FACTORS = (
    "sinks", "logits_soft_cap", "head_windows", "kv_lengths", "block_mask", "bias_factors")
ALL = frozenset({SINKS, SOFT_CAP, HEAD_WINDOWS, KV_LENGTHS, BLOCK_MASK, BIAS_FACTORS})
GENERIC = frozenset({SINKS, BIAS_FACTORS})  # every backend gets these through the adapters above

# Backend name -> the features it handles itself. Kernels: add a name here when the kernel lands (the kernel's
# `dot_product_backend` adapter then receives the arrays `sinks`, `kv_lengths`, `block_mask`, `bias_factors` as
# keyword arguments, and `spec.logits_soft_cap`, `spec.head_windows`, `spec.block_shape`).
NATIVE = {
    "reference": ALL,
    "xla": frozenset({SOFT_CAP, HEAD_WINDOWS, KV_LENGTHS, BLOCK_MASK}),
    "pallas": frozenset(),
    "triton": frozenset(),
}


def tagged(name, fn):
    """A backend's loaded function, marked with its name so `prepare` knows what it handles natively."""
    call = functools.partial(fn)
    call.backend_name = name
    return call


def check_soft_cap(cap):
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not cap > 0 or cap == float("inf"):
        raise ValueError(f"`logits_soft_cap` must be a positive finite float, got {cap!r}")
    return float(cap)


def check_block_shape(block_mask, block_shape):
    if block_mask is None:
        if block_shape is not None:
            raise ValueError(f"`block_shape` {block_shape!r} given without a `block_mask`")
        return None
    return block_sparse.check_block_shape(block_shape)


@dataclasses.dataclass(frozen=True)
class Extras:
    """The validated array features (None where not given)."""
    sinks: object = None
    kv_lengths: object = None
    block_mask: object = None
    bias_factors: tuple | None = None


def validate(query, key, value, spec, *, sinks=None, kv_lengths=None, block_mask=None, bias_factors=None):
    """Checks the array features against `query [B, T, N, H]`, `key [B, S, K, H]`; ValueError naming each."""
    b, t, n, _ = query.shape
    s, k = key.shape[1], key.shape[2]
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        validation.check_floating("sinks", sinks)
        if tuple(sinks.shape) != (n,):
            raise ValueError(f"`sinks` must have shape ({n},) (one logit per query head of query "
                             f"{tuple(query.shape)}), got {tuple(sinks.shape)}")
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths)
        if tuple(kv_lengths.shape) != (b,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
            raise ValueError(f"`kv_lengths` must be an integer array of shape ({b},) (valid keys per batch row of "
                             f"key {tuple(key.shape)}), got shape {tuple(kv_lengths.shape)} dtype {kv_lengths.dtype}")
    if block_mask is not None:
        block_mask = jnp.asarray(block_mask)
        block_sparse.check_block_mask(block_mask, spec.block_shape, b, n, t, s)
    if bias_factors is not None:
        bias_factors = _check_factors(bias_factors, query, key, spec)
    return Extras(sinks, kv_lengths, block_mask, bias_factors)


def _check_factors(bias_factors, query, key, spec):
    b, t, n, _ = query.shape
    s, k = key.shape[1], key.shape[2]
    if not isinstance(bias_factors, (tuple, list)) or len(bias_factors) != 2:
        raise ValueError("`bias_factors` must be a pair (u [B, T, N, R], w [B, S, N or K, R])")
    u, w = (jnp.asarray(x) for x in bias_factors)
    for name, x in (("bias_factors[0] (u)", u), ("bias_factors[1] (w)", w)):
        validation.check_floating(name, x)
    ok = (u.ndim == 4 and w.ndim == 4 and u.shape[:3] == (b, t, n) and w.shape[:2] == (b, s)
          and w.shape[2] in (n, k) and u.shape[3] == w.shape[3] and u.shape[3] > 0)
    if not ok:
        raise ValueError(f"`bias_factors` must be (u [B, T, N, R], w [B, S, N or K, R]) = ([{b}, {t}, {n}, R], "
                         f"[{b}, {s}, {n} or {k}, R]) for query {tuple(query.shape)} and key {tuple(key.shape)}, "
                         f"got u {tuple(u.shape)} and w {tuple(w.shape)}")
    if spec.logits_soft_cap is not None:
        raise ValueError("`bias_factors` cannot be combined with `logits_soft_cap`: the cap applies to the logits "
                         "before the bias, while the factors join the logits through the head dim")
    return u, w


def used(spec, extras: Extras) -> frozenset:
    """The features a call uses that a backend must handle itself (what `supports` predicates are asked)."""
    names = {SOFT_CAP: spec.logits_soft_cap is not None, HEAD_WINDOWS: spec.head_windows is not None,
             KV_LENGTHS: extras.kv_lengths is not None, BLOCK_MASK: extras.block_mask is not None}
    return frozenset(name for name, on in names.items() if on)


def extend_head_dim(query, key, value, u, w, scale):
    """FlashBias through the head dim: `([q, u / scale], [k, w], value)`; with `w` per query head and fewer
    key/value heads, the keys and values are repeated per query head first."""
    n, k = query.shape[2], key.shape[2]
    if w.shape[2] != k:
        key, value = jnp.repeat(key, n // k, axis=2), jnp.repeat(value, n // k, axis=2)
    q_ext = jnp.concatenate([query, (u.astype(jnp.float32) / scale).astype(query.dtype)], axis=-1)
    k_ext = jnp.concatenate([key, w.astype(key.dtype)], axis=-1)
    return q_ext, k_ext, value


@dataclasses.dataclass(frozen=True)
class Call:
    query: object
    key: object
    value: object
    scale: float
    extras: Extras


def for_backend(call: Call, impl, query, key, value):
    """`(query, key, value, kwargs)` for the resolved backend: its native features as keyword arguments, the
    generic ones applied (`call` holds the extended head dims)."""
    native = NATIVE.get(getattr(impl, "backend_name", None), frozenset())
    extras = call.extras
    kwargs = {}
    for name in (SINKS, KV_LENGTHS, BLOCK_MASK):
        value_ = getattr(extras, name)
        if value_ is not None and (name in native or name not in GENERIC):
            kwargs[name] = value_
    if extras.bias_factors is not None:
        if BIAS_FACTORS in native:
            kwargs[BIAS_FACTORS] = extras.bias_factors
        else:
            query, key, value = call.query, call.key, call.value
    return query, key, value, kwargs


def prepare(query, key, value, scale, extras: Extras) -> Call:
    """The arrays every non-native backend gets (head dims extended for `bias_factors`)."""
    if extras.bias_factors is not None:
        query, key, value = extend_head_dim(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value),
                                            *extras.bias_factors, scale)
    return Call(query, key, value, scale, extras)


def finish(out, lse, impl, call: Call):
    """Merges the sinks for a backend that does not take them itself; returns `(out, lse)`."""
    native = NATIVE.get(getattr(impl, "backend_name", None), frozenset())
    sinks = call.extras.sinks
    if sinks is None or SINKS in native:
        return out, lse
    b, t, n, hv = out.shape
    rows = jnp.swapaxes(out.astype(jnp.float32), 1, 2)  # [B, N, T, Hv]
    merged, lse = softmax.merge_sink(rows, lse, sinks.astype(jnp.float32)[None, :, None])
    return jnp.swapaxes(merged, 1, 2).astype(out.dtype), lse
