"""Agent attention (Han et al. 2024): a few agent tokens gather from the keys, then broadcast to the queries."""
from jaxattn.agent.api import agent_attention

__all__ = ["agent_attention"]
