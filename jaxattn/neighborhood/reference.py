"""Brute-force neighborhood attention: per query, gather its key set and bias indices, then softmax. For tests.

Copies k/v once per (query, window slot), i.e. `prod(kernel_size)`-fold: obviously correct, not fast.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import neighborhood_windows as windows


@functools.lru_cache(maxsize=64)
def _tables(spatial: tuple[int, ...], spec: windows.NASpec):
    """Flat key index, validity and per-axis rpb indices, each `[n_queries, n_slots]` (numpy)."""
    per_axis = [windows.axis_tables(length, *spec.axis(a)) for a, length in enumerate(spatial)]
    nd = len(spatial)
    # Broadcast per-axis [L_a, k_a] tables to [L_1, .., L_nd, k_1, .., k_nd]: the product of the axis windows.
    def expand(x, a):
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = x.shape
        return x.reshape(shape)

    keys = [expand(t[0], a) for a, t in enumerate(per_axis)]
    flat_keys = np.ravel_multi_index(np.broadcast_arrays(*keys), spatial)
    valid = np.logical_and.reduce(np.broadcast_arrays(*[expand(t[1], a) for a, t in enumerate(per_axis)]))
    rel = [np.broadcast_to(expand(t[2], a), valid.shape) for a, t in enumerate(per_axis)]
    n, slots = int(np.prod(spatial)), int(np.prod(spec.kernel_size))
    return (flat_keys.reshape(n, slots).astype(np.int32), valid.reshape(n, slots),
            tuple(r.reshape(n, slots) for r in rel))


def neighborhood_reference(query, key, value, rpb, *, scale, spec: windows.NASpec):
    """Returns `(out [B, *spatial, N, Hv] in query dtype, lse [B, *spatial, N])`, computed in fp32 (fp64 inputs
    stay fp64, for numerical gradient checks)."""
    b, *spatial, n_heads, h = query.shape
    spatial = tuple(spatial)
    num_kv, hv = key.shape[-2], value.shape[-1]
    g = n_heads // num_kv
    n = int(np.prod(spatial))
    flat_keys, valid, rel = _tables(spatial, spec)

    dt = jnp.promote_types(query.dtype, jnp.float32)  # fp32, or fp64 under x64 (for numerical gradient checks)
    q = query.astype(dt).reshape(b, n, num_kv, g, h)
    k = key.astype(dt).reshape(b, n, num_kv, h)[:, flat_keys]  # [B, n, slots, K, H]
    v = value.astype(dt).reshape(b, n, num_kv, hv)[:, flat_keys]
    logits = jnp.einsum("bqkgh,bqskh->bkgqs", q, k) * scale
    if rpb is not None:
        bias = rpb.astype(dt)[(slice(None),) + tuple(rel)]  # [N, n, slots]
        logits = logits + bias.reshape(num_kv, g, n, -1)
    logits = jnp.where(valid, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # every query sees at least itself: finite
    p = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgqs,bqskv->bqkgv", p, v)
    out = out.reshape(b, *spatial, n_heads, hv).astype(query.dtype)
    lse = jnp.moveaxis(lse.reshape(b, n_heads, n), 1, -1).reshape(b, *spatial, n_heads)
    return out, lse
