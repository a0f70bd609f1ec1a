"""Public entry point of agent attention: validation and the choice between the reference and the two-pass path."""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import dispatch, validation
from jaxattn.dot_product import api as dot_product_api

LAYOUTS = {"query": "[batch, q_len, num_heads, head_dim]", "key": "[batch, kv_len, num_kv_heads, head_dim]",
           "value": "[batch, kv_len, num_kv_heads, v_head_dim]", "agents": "[batch, num_agents, num_heads, head_dim]"}


def agent_attention(query, key, value, agents, *, key_bias=None, query_bias=None, scale=None, implementation=None):
    """Agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear Attention").

    `n` agent tokens first gather from the keys, then broadcast to the queries:
      `V_A = softmax(agents . key^T * scale + key_bias) value`      (`[B, n, N, Hv]`)
      `out = softmax(query . agents^T * scale + query_bias) V_A`    (`[B, T, N, Hv]`)
    Cost and memory are O((T + S) * n) instead of O(T * S). The agents are usually pooled from the queries (the
    `AgentAttention` layer of the model zoo does that, and adds the agent biases and the depthwise conv of V).

    Args:
      query: `[B, T, N, H]`.
      key: `[B, S, K, H]` with `N % K == 0` (grouped-query attention in the gathering step).
      value: `[B, S, K, Hv]`.
      agents: `[B, n, N, H]`, `n >= 1`; the same dtype as query, key and value.
      key_bias: optional additive logits of the gathering step, broadcastable to `[B, N, n, S]`; differentiable.
      query_bias: optional additive logits of the broadcasting step, broadcastable to `[B, N, T, n]`.
      scale: logit scale of both steps, default `H ** -0.5`.
      implementation: 'reference' (both softmaxes materialised in fp32, for tests), or an implementation of
        `dot_product_attention` ('xla', 'pallas', 'triton', ...) used by both of its calls; None picks that op's
        best on this platform.

    Returns:
      `[B, T, N, Hv]` in the query dtype.
    """
    query, key, value, agents = (jnp.asarray(x) for x in (query, key, value, agents))
    _check_arrays(query, key, value, agents)
    b, t, n, h = query.shape
    num_agents, s = agents.shape[1], key.shape[1]
    for name, bias, target, layout in (("key_bias", key_bias, (b, n, num_agents, s), "[B, N, n, S]"),
                                       ("query_bias", query_bias, (b, n, t, num_agents), "[B, N, T, n]")):
        if bias is not None:
            validation.check_broadcastable(name, bias, target, layout)
            validation.check_floating(name, bias)
    scale = h ** -0.5 if scale is None else float(scale)
    if implementation == "reference":
        from jaxattn.agent.reference import agent_attention_reference
        return agent_attention_reference(query, key, value, agents, key_bias, query_bias, scale=scale)
    if implementation is not None:
        validation.check_choice("implementation", implementation, dispatch.names(dot_product_api.OP))
    from jaxattn.agent.two_pass import agent_attention_two_pass
    return agent_attention_two_pass(query, key, value, agents, key_bias, query_bias, scale=scale,
                                    implementation=implementation)


def _check_arrays(query, key, value, agents):
    arrays = {"query": query, "key": key, "value": value, "agents": agents}
    for name, x in arrays.items():
        validation.check_rank(name, x, 4, LAYOUTS[name])
        validation.check_floating(name, x)
    validation.check_same_dtype(**arrays)
    for name in ("key", "value", "agents"):
        validation.check_dim(name, arrays[name], 0, query.shape[0], "batch size", "`query`")
    for name in ("key", "agents"):
        validation.check_dim(name, arrays[name], -1, query.shape[-1], "head_dim", "`query`")
    validation.check_dim("agents", agents, 2, query.shape[2], "num_heads", "`query`")
    validation.check_dim("value", value, 1, key.shape[1], "kv_len", "`key`")
    validation.check_dim("value", value, 2, key.shape[2], "num_kv_heads", "`key`")
    num_heads, num_kv = query.shape[2], key.shape[2]
    if num_kv == 0 or num_heads % num_kv:
        raise ValueError(f"`query` heads ({num_heads}) must be a multiple of `key`/`value` heads ({num_kv}); "
                         f"shapes {tuple(query.shape)} and {tuple(key.shape)}")
    if agents.shape[1] == 0:
        raise ValueError(f"`agents` must hold at least one agent token, got shape {tuple(agents.shape)}")
