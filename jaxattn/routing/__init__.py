"""Bi-level routing attention (BiFormer), heads-last."""
from jaxattn.routing.api import bilevel_routing_attention

__all__ = ["bilevel_routing_attention"]
