"""Blocked neighborhood attention in plain XLA: query tiles against their key halos, chunk by chunk.

Each query tile attends to the contiguous halo of keys that holds all of its windows, with the exact windows as an
additive `-inf` mask (`jaxattn.neighborhood.layout` describes the blocking). Logits exist for one chunk of tiles
at a time (`logit_budget` fp32 elements, small enough to stay in cache), never `tokens x tokens`: memory is
O(tokens) for the inputs and outputs plus O(budget). The backward pass is a `custom_vjp` that recomputes each
chunk's probabilities from the saved log-sum-exp (FlashAttention-2 style) and scatter-adds key/value gradients
from the halos back into place.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.core import neighborhood_windows as windows
from jaxattn.neighborhood.layout import Layout

# fp32 logits per chunk (elements, 2 MiB): chunks that stay in cache beat one big pass (measured on CPU).
LOGIT_BUDGET = 1 << 19


def neighborhood_blocked(query, key, value, rpb, *, scale, spec: windows.NASpec, tile=None,
                         logit_budget: int = LOGIT_BUDGET):
    """Returns `(out [B, *spatial, N, Hv] in query dtype, lse [B, *spatial, N] fp32)`.

    `tile`: queries per tile along each axis (int or tuple, in dilation-group indices; default
    `tiling.DEFAULT_TILE`). `logit_budget`: fp32 logits per chunk.
    """
    layout = Layout.make(query.shape, key.shape[-2], spec, tile, logit_budget)
    out, lse = _attend(layout.queries_in(query), layout.keys_in(key), layout.keys_in(value), rpb, scale, layout)
    return layout.queries_out(out).astype(query.dtype), layout.queries_out(lse[..., None])[..., 0]


def _rpb5(rpb, layout: Layout):
    if rpb is None:
        return None
    return rpb.astype(jnp.float32).reshape(layout.num_kv, layout.groups, *[2 * p.kernel - 1 for p in layout.plans])


def _logits(layout: Layout, scale, q, k, xs, rpb5):
    """fp32 masked, biased logits `[rows, G * n_rows, n_keys]` of one chunk."""
    logits = jnp.einsum("bqh,bsh->bqs", q, k, preferred_element_type=jnp.float32) * scale
    logits = logits.reshape(layout.batch * layout.num_kv, layout.n_tiles, layout.groups, layout.n_rows, -1)
    logits = logits + layout.mask(xs["mask"])
    if rpb5 is not None:
        logits = (logits.reshape(layout.batch, layout.num_kv, *logits.shape[1:])
                  + layout.bias(rpb5, xs["one_hot"]))
    return logits.reshape(layout.rows, layout.groups * layout.n_rows, layout.n_keys)


def _map(fn, xs, n_chunks):
    """`lax.map` over the leading chunk axis, or a plain call when there is one chunk."""
    if n_chunks == 1:
        return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(fn, xs)


def _forward(q_chunks, key, value, rpb, scale, layout: Layout):
    rpb5 = _rpb5(rpb, layout)

    def chunk(xs):
        k, v = layout.halos(key, xs["index"]), layout.halos(value, xs["index"])
        logits = _logits(layout, scale, xs["q"], k, xs, rpb5)
        m = jnp.max(logits, axis=-1)  # every row sees at least one key: finite
        p = jnp.exp(logits - m[..., None])
        l = jnp.sum(p, axis=-1)
        out = jnp.einsum("bqs,bsv->bqv", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out / l[..., None], m + jnp.log(l)

    xs = {"q": q_chunks, **layout.chunk_tables(rpb is not None)}
    return _map(chunk, xs, layout.n_chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q_chunks, key, value, rpb, scale, layout):
    """Chunked queries `[n_chunks, rows, G * n_rows, H]`, padded keys/values -> fp32 `(out, lse)` in chunks."""
    return _forward(q_chunks, key, value, rpb, scale, layout)


def _attend_fwd(q_chunks, key, value, rpb, scale, layout):
    out, lse = _forward(q_chunks, key, value, rpb, scale, layout)
    return (out, lse), (q_chunks, key, value, rpb, out, lse)


def _attend_bwd(scale, layout: Layout, residuals, cotangents):
    q_chunks, key, value, rpb, out, lse = residuals
    d_out, d_lse = cotangents
    rpb5 = _rpb5(rpb, layout)
    f32 = jnp.float32
    delta = jnp.sum(d_out * out, axis=-1) - d_lse  # d lse / d logits = p folds into the usual delta

    def chunk(carry, xs):
        d_key, d_value, d_rpb = carry
        q = xs["q"].astype(f32)
        k, v = layout.halos(key, xs["index"]).astype(f32), layout.halos(value, xs["index"]).astype(f32)
        p = jnp.exp(_logits(layout, scale, q, k, xs, rpb5) - xs["lse"][..., None])  # masked -> 0
        d_value = layout.add_halos(d_value, jnp.einsum("bqs,bqv->bsv", p, xs["d_out"]), xs["index"])
        ds = p * (jnp.einsum("bqv,bsv->bqs", xs["d_out"], v) - xs["delta"][..., None])
        d_q = jnp.einsum("bqs,bsh->bqh", ds, k) * scale
        d_key = layout.add_halos(d_key, jnp.einsum("bqs,bqh->bsh", ds, q) * scale, xs["index"])
        if rpb5 is not None:
            d_bias = ds.reshape(layout.batch, layout.num_kv * layout.n_tiles * layout.groups, -1).sum(0)
            d_rpb = d_rpb + layout.bias_grad(d_bias, xs["one_hot"])
        return (d_key, d_value, d_rpb), d_q

    xs = {"q": q_chunks, "lse": lse, "d_out": d_out.astype(f32), "delta": delta,
          **layout.chunk_tables(rpb is not None)}
    carry = (jnp.zeros(key.shape, f32), jnp.zeros(value.shape, f32), None if rpb5 is None else jnp.zeros_like(rpb5))
    if layout.n_chunks == 1:
        carry, d_q = chunk(carry, jax.tree.map(lambda x: x[0], xs))
        d_q = d_q[None]
    else:
        carry, d_q = jax.lax.scan(chunk, carry, xs)
    d_key, d_value, d_rpb = carry
    d_rpb = None if rpb is None else d_rpb.reshape(rpb.shape).astype(rpb.dtype)
    return d_q.astype(q_chunks.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype), d_rpb


_attend.defvjp(_attend_fwd, _attend_bwd)
