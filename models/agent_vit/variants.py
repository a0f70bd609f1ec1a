"""Registered agent-attention vision transformers."""
from __future__ import annotations

from flax import nnx

from jaxattn.models.agent_vit.model import AgentViT
from jaxattn.models.registry import register


@register("agent_vit_pico")
def agent_vit_pico(*, rngs: nnx.Rngs, **overrides) -> AgentViT:
    """Agent-ViT-Pico (ours, not in the paper; a test model): 32 px images, 4 px patches (8 x 8 tokens), embed 64,
    depth 2, heads 2, 4 x 4 agents, MLP ratio 4. 181,928 parameters (1000 classes)."""
    kwargs = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, agent_grid=4, mlp_ratio=4.0)
    kwargs.update(overrides)
    return AgentViT(rngs=rngs, **kwargs)
