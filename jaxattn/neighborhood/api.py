"""Public entry points of neighborhood attention (NA, dilated NA, causal NA, strided/GNA): validation, dispatch."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxattn.core import dispatch, validation
from jaxattn.core import neighborhood_windows as windows

OP = "neighborhood_attention"
LAYOUT_Q = "[batch, *spatial, num_heads, head_dim] with 1, 2 or 3 spatial axes"


def _load_reference():
    from jaxattn.neighborhood.reference import neighborhood_reference
    return neighborhood_reference


def _load_xla():
    from jaxattn.neighborhood.xla import neighborhood_blocked
    return neighborhood_blocked


def _load_pallas():
    from jaxattn.kernels.neighborhood_attention.pallas import attention
    return attention


def _pallas_supports(**op_args):
    """Needs a relative position bias table small enough to expand in the kernel (larger ones go to xla)."""
    from jaxattn.kernels.neighborhood_attention.pallas import supports
    return supports(**op_args)


dispatch.register(OP, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
dispatch.register(OP, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))
dispatch.register(OP, dispatch.Backend("pallas", _load_pallas, platforms=("tpu", "gpu"), priority=1,
                                       supports=_pallas_supports, takes_target=True))


def neighborhood_attention(query, key, value, kernel_size, *, dilation=1, stride=1, is_causal=False, rpb=None,
                           scale=None, return_lse=False, implementation=None):
    """Neighborhood attention over 1, 2 or 3 spatial axes, heads-last, with NATTEN's semantics.

    Each query attends to a `k1 x .. x kd` box of keys around it: per axis, the `k` nearest positions of its
    dilation group, shifted inward at the borders (never truncated) so every query sees exactly `k` keys
    (NATTEN 0.14 arithmetic for odd `k`; even `k` puts `k/2` keys before the query and `k/2 - 1` after, as
    NATTEN >= 0.17.5). Softmax runs over that box only. Full rules: `jaxattn.core.neighborhood_windows`.

    Args:
      query: `[B, *spatial, N, H]`, `len(spatial)` in 1..3.
      key: `[B, *spatial, K, H]` with `N % K == 0` (K < N is grouped-query attention).
      value: `[B, *spatial, K, Hv]`.
      kernel_size: window `k` per axis (int or tuple), `1 <= k`, and `k * dilation <= axis length`.
      dilation: `d` per axis: the axis splits into `d` interleaved groups (`i % d`) and a query attends within
        its group (DiNA). Axes not divisible by `d` give groups of two lengths; each is clamped on its own.
      stride: `s <= k` per axis (GNA, NATTEN >= 0.20): runs of `s` consecutive queries of a dilation group share
        the window of their leader, the centre query `first + s // 2` (its last query `first + s - 1` when
        causal). When the group length is not a multiple of `s`, the last, partial run is led by
        `min(leader, last query)`, as in NATTEN. `s == k, d == 1` is blocked (Swin-style) window attention.
      is_causal: bool per axis: query `i` sees keys `max(leader - k + 1, 0) .. i` of its group (no shift, so early
        queries see fewer keys; with stride, the leader's window cut at the query itself).
      rpb: optional relative position bias `[N, 2k1-1 (, 2k2-1 (, 2k3-1))]` (NAT/DiNAT, NATTEN <= 0.17): the bias
        of key `m` for query `ii` (group indices) is `rpb[h, m1 - ii1 + k1 - 1, ...]`; differentiable. NATTEN
        defines it only for odd kernels, non-causal axes and no stride, so anything else raises `ValueError`.
      scale: logit scale, default `H ** -0.5` (applied to `q . k`, before the bias).
      return_lse: also return the fp32 log-sum-exp of the scaled, biased logits over each window,
        `[B, *spatial, N]`.
      implementation: 'reference' (brute force, copies k/v once per window slot), 'xla' (query tiles against
        their key halos in cache-sized chunks: memory O(tokens) plus a fixed chunk; recomputing backward),
        kernels where registered, or None for the best available on this platform.

    Returns:
      `out [B, *spatial, N, Hv]` in the query dtype, or `(out, lse)`.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    rpb = None if rpb is None else jnp.asarray(rpb)
    spec, scale = _validate(query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale)
    out, lse = dispatch.call(OP, implementation, lambda impl: impl(query, key, value, rpb, scale=scale, spec=spec),
                             query=query, key=key, value=value, rpb=rpb, spec=spec)
    return (out, lse) if return_lse else out


def _shorthand(ndim):
    def na(query, key, value, kernel_size, **kwargs):
        query = jnp.asarray(query)
        validation.check_rank("query", query, ndim + 3, f"[batch, {'*' if ndim > 1 else ''}spatial ({ndim} axes), "
                                                        f"num_heads, head_dim]")
        return neighborhood_attention(query, key, value, kernel_size, **kwargs)

    na.__name__ = na.__qualname__ = f"na{ndim}d"
    na.__doc__ = (f"`neighborhood_attention` on {ndim} spatial axis{'es' if ndim > 1 else ''}: query "
                  f"`[B, {', '.join(f'L{i + 1}' for i in range(ndim))}, N, H]`; same keyword arguments.")
    return na


na1d, na2d, na3d = _shorthand(1), _shorthand(2), _shorthand(3)


def _per_axis_int(name, value, ndim, minimum):
    items = (value,) * ndim if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    if len(items) != ndim or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise ValueError(f"`{name}` must be an int or a tuple of {ndim} ints (one per spatial axis), got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"`{name}` must be >= {minimum} on every axis, got {value!r}")
    return tuple(int(v) for v in items)


def _per_axis_bool(name, value, ndim):
    items = (value,) * ndim if isinstance(value, (bool, np.bool_)) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    if len(items) != ndim or not all(isinstance(v, (bool, np.bool_)) for v in items):
        raise ValueError(f"`{name}` must be a bool or a tuple of {ndim} bools (one per spatial axis), got {value!r}")
    return tuple(bool(v) for v in items)


def _validate(query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale):
    validation.check_rank("query", query, (4, 5, 6), LAYOUT_Q)
    nd = query.ndim - 3
    kv_layout = f"[batch, *spatial ({nd} axes), num_kv_heads, head_dim]"
    validation.check_rank("key", key, query.ndim, kv_layout)
    validation.check_rank("value", value, query.ndim, kv_layout)
    for name, x in (("query", query), ("key", key), ("value", value)):
        validation.check_floating(name, x)
    validation.check_same_dtype(query=query, key=key, value=value)
    for name, x in (("key", key), ("value", value)):
        if x.shape[:nd + 1] != query.shape[:nd + 1]:
            raise ValueError(f"`{name}` batch and spatial dims {tuple(x.shape[:nd + 1])} (shape {tuple(x.shape)}) "
                             f"must equal those of `query` {tuple(query.shape[:nd + 1])}")
    validation.check_dim("key", key, -1, query.shape[-1], "head_dim", "`query`")
    validation.check_dim("value", value, -2, key.shape[-2], "num_kv_heads", "`key`")
    n, num_kv = query.shape[-2], key.shape[-2]
    if num_kv == 0 or n % num_kv:
        raise ValueError(f"`query` heads ({n}) must be a multiple of `key`/`value` heads ({num_kv}); "
                         f"shapes {tuple(query.shape)} and {tuple(key.shape)}")

    spatial = tuple(query.shape[1:nd + 1])
    kernel = _per_axis_int("kernel_size", kernel_size, nd, 1)
    dil = _per_axis_int("dilation", dilation, nd, 1)
    strd = _per_axis_int("stride", stride, nd, 1)
    causal = _per_axis_bool("is_causal", is_causal, nd)
    for a in range(nd):
        if kernel[a] * dil[a] > spatial[a]:
            raise ValueError(f"`kernel_size` * `dilation` ({kernel[a]} * {dil[a]}) exceeds spatial axis {a} of "
                             f"length {spatial[a]} (query shape {tuple(query.shape)})")
        if strd[a] > kernel[a]:
            raise ValueError(f"`stride` ({strd[a]}) must not exceed `kernel_size` ({kernel[a]}) on axis {a}")

    if rpb is not None:
        want = (n,) + tuple(2 * k - 1 for k in kernel)
        if tuple(rpb.shape) != want:
            raise ValueError(f"`rpb` must have shape [num_heads, 2k1-1, ...] = {want} for kernel_size {kernel}, "
                             f"got {tuple(rpb.shape)}")
        validation.check_floating("rpb", rpb)
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"`rpb` is defined only for odd kernels (NATTEN <= 0.17), got kernel_size {kernel}")
        if any(causal):
            raise ValueError(f"`rpb` is not defined with causal axes (NATTEN), got is_causal {causal}")
        if any(s > 1 for s in strd):
            raise ValueError(f"`rpb` is not defined with stride > 1 (NATTEN), got stride {strd}")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return windows.NASpec(kernel, dil, strd, causal), float(scale)
