"""jaxattn: efficient attention for JAX.

Functional ops on heads-last arrays `[batch, *tokens, heads, head_dim]`. Each op takes `implementation=`:
'reference' (obviously correct, for tests), 'xla' (blocked, memory-lean), kernels where registered, or None for
the best available on the current platform.

Ops are loaded on first use, so `import jaxattn` stays cheap and an op's module is imported only when needed.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> module that defines it. Each op lives in its own subpackage (see WORKSPACE.md).
_OPS = {
    "dot_product_attention": "jaxattn.dot_product",
    "dot_product_attention_backward": "jaxattn.dot_product",
    "neighborhood_attention": "jaxattn.neighborhood",
    "na1d": "jaxattn.neighborhood",
    "na2d": "jaxattn.neighborhood",
    "na3d": "jaxattn.neighborhood",
    "halo_attention": "jaxattn.halo",
    "block_attention": "jaxattn.multi_axis",
    "grid_attention": "jaxattn.multi_axis",
    "bilevel_routing_attention": "jaxattn.routing",
    "lightning_attention": "jaxattn.lightning",
    "lightning_attention_step": "jaxattn.lightning",
    "lightning_slopes": "jaxattn.lightning",
    "agent_attention": "jaxattn.agent",
    "explain": "jaxattn.core.dispatch",  # which backend each op call gets per lowering platform, and why
}
_SUBMODULES = ("core", "testing", "context_parallel", "kernels", "models", "train", "configs")


def __getattr__(name):
    if name in _OPS:
        value = getattr(importlib.import_module(_OPS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxattn.{name}")
    raise AttributeError(f"module 'jaxattn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_OPS) + list(_SUBMODULES))


__all__ = list(_OPS)

if TYPE_CHECKING:  # for static analysis and IDEs
    from jaxattn.dot_product import dot_product_attention  # noqa: F401
