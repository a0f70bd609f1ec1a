"""Obviously-correct agent attention: both softmaxes materialised in fp32 (`[B, N, n, S]` and `[B, N, T, n]`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_attention(query, key, value, bias, scale):
    """`softmax(q k^T * scale + bias) v` in fp32 with k/v heads repeated to the query heads (GQA).
    `query [B, T, N, H]`, `key [B, S, K, H]`, `value [B, S, K, Hv]`, `bias` broadcastable to `[B, N, T, S]`."""
    groups = query.shape[2] // key.shape[2]
    key, value = (jnp.repeat(x.astype(jnp.float32), groups, axis=2) for x in (key, value))
    logits = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32), key) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), value)


def agent_attention_reference(query, key, value, agents, key_bias, query_bias, *, scale):
    """`V_A = softmax(A K^T * scale + key_bias) V`, `out = softmax(Q A^T * scale + query_bias) V_A`.

    Returns `out [B, T, N, Hv]` in the query dtype.
    """
    agent_values = softmax_attention(agents, key, value, key_bias, scale)  # [B, n, N, Hv]
    out = softmax_attention(query, agents, agent_values, query_bias, scale)
    return out.astype(query.dtype)
