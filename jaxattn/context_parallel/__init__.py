"""Context parallelism: attention over a sequence (or image rows) sharded along one mesh axis.

Every strategy is a `jax.shard_map` program over the mesh axis `axis_name` (default `'context'`). The public
functions take and return *global* arrays (heads-last, sequence sharded along `axis_name`), so they drop into
jitted model code that runs under a mesh (`jax.sharding.use_mesh` / `jax.set_mesh`, or `mesh=` explicitly). The
batch axis is split over `batch_axes` (default: every other mesh axis). The per-device bodies are public in their
modules too, for callers who already sit inside their own `shard_map`.

Strategies:
- `ring_attention`: K/V rotate round the ring, partial results merge through their lse; zigzag load balance.
- `allgather_attention`: K/V gathered once over the axis (cheap with few KV heads).
- `ulysses_attention`: all-to-all sequence <-> heads; the axis size must divide the head count.
- `lasp2_lightning_attention`: one all-gather of per-device linear-attention states, prefix combine with decay.
- `halo_neighborhood_attention`: neighbours exchange only the border tokens a window needs.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ring_attention": "jaxattn.context_parallel.ring",
    "zigzag_permute": "jaxattn.context_parallel.zigzag",
    "zigzag_unpermute": "jaxattn.context_parallel.zigzag",
    "allgather_attention": "jaxattn.context_parallel.allgather",
    "ulysses_attention": "jaxattn.context_parallel.ulysses",
    "lasp2_lightning_attention": "jaxattn.context_parallel.lasp2",
    "halo_neighborhood_attention": "jaxattn.context_parallel.halo_exchange",
    "halo_exchange_halo_attention": "jaxattn.context_parallel.halo_exchange",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
