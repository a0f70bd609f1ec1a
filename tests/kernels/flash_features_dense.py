"""A dense formula of flash attention's issue-16 features (sinks, soft-cap, per-head windows, kv_lengths, block
masks), written straight from ../shared/reference/attention_variants.md: the ground truth of the kernel tests.
Shared by the Pallas tests and the Triton interpreter child (pure jax)."""
import jax
import jax.numpy as jnp
import numpy as np


def dense_attention(q, k, v, sinks=None, *, scale, causal=False, window=None, soft_cap=None, kv_lengths=None,
                    block_mask=None, block_shape=None, bias=None):
    """`(out [B, T, N, Hv], lse [B, N, T])` by materialising every logit. `window`: a pair or one per head."""
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    k = jnp.repeat(k, n // kh, axis=2)
    v = jnp.repeat(v, n // kh, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    if bias is not None:
        logits = logits + bias
    lengths = jnp.full((b,), s) if kv_lengths is None else kv_lengths
    offset = (lengths - t)[:, None, None, None]  # query i sits at key position lengths[b] - T + i
    rel = jnp.arange(s)[None, None, None, :] - (jnp.arange(t)[None, None, :, None] + offset)
    keep = jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    if causal:
        keep = keep & (rel <= 0)
    if window is not None:
        pairs = [window] * n if isinstance(window[0], int) else [(t + s, t + s) if w is None else w for w in window]
        left = jnp.asarray([p[0] for p in pairs])[None, :, None, None]
        right = jnp.asarray([p[1] for p in pairs])[None, :, None, None]
        keep = keep & (rel >= -left) & (rel <= right)
    if block_mask is not None:
        bq, bk = block_shape
        keep = keep & block_mask[:, :, np.arange(t) // bq][:, :, :, np.arange(s) // bk]
    logits = jnp.where(keep, logits, -jnp.inf)
    if sinks is not None:
        sink_col = jnp.broadcast_to(sinks[None, :, None, None], (b, n, t, 1))
        logits = jnp.concatenate([logits, sink_col], axis=-1)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    seen = total > 0
    p = e / jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)[..., 0]
    out = jnp.einsum("bnts,bsnh->btnh", p[..., :s], v)
    return out, lse


def feature_case(kernel, opts, shapes, *, seed=0):
    """`(impl, reference, inputs)` for `assert_matches_reference`: `kernel(q, k, v, sinks=..., **opts)` against
    `dense_attention` with the same options (`sinks=True` adds `[N]` sink logits to the differentiated inputs,
    `kv_lengths` may be a tuple)."""
    from jaxattn.testing import random_inputs
    opts = dict(opts)
    with_sinks = opts.pop("sinks", False)
    if "kv_lengths" in opts:
        opts["kv_lengths"] = jnp.asarray(opts["kv_lengths"], jnp.int32)
    inputs = list(random_inputs(seed, shapes))
    heads, head_dim = shapes[0][2], shapes[0][3]
    if with_sinks:
        inputs.append(jnp.linspace(-1.0, 2.0, heads))

    def impl(q, k, v, *sinks):
        return kernel(q, k, v, sinks=sinks[0] if sinks else None, **opts)

    def reference(q, k, v, *sinks):
        dense = dict(opts)
        return dense_attention(q, k, v, sinks[0] if sinks else None, scale=head_dim ** -0.5,
                               causal=dense.pop("is_causal", False), soft_cap=dense.pop("logits_soft_cap", None),
                               **dense)

    return impl, reference, inputs
