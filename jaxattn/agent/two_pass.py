"""Agent attention as two calls of `dot_product_attention`, so it runs on that op's kernels (flash on GPU/TPU,
blocked XLA elsewhere). Nothing of size `T x S` exists: the logits are `n x S` and `T x n`."""
from __future__ import annotations

from jaxattn.dot_product import dot_product_attention


def agent_attention_two_pass(query, key, value, agents, key_bias, query_bias, *, scale, implementation):
    """Gather `V_A [B, n, N, Hv]` from the keys with the agents as queries, then attend the queries to the agents.
    `implementation` is passed to both calls (a `dot_product_attention` backend name, or None)."""
    agent_values = dot_product_attention(agents, key, value, key_bias, scale=scale, implementation=implementation)
    return dot_product_attention(query, agents, agent_values, query_bias, scale=scale,
                                 implementation=implementation)
