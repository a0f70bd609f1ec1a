"""Flax NNX model zoo built on the jaxattn ops. Installed as `jaxattn.models`.

    from jaxattn import models
    model = models.create_model("maxvit_tiny", num_classes=1000, rngs=nnx.Rngs(0))
    models.list_models()
"""
from jaxattn.models.registry import create_model, get_entry, list_models, register
from jaxattn.models.generate import generate

__all__ = ["create_model", "get_entry", "list_models", "register"]
