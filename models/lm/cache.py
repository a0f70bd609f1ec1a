"""The decode cache carried between calls: absolute position plus the states of every layer."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """`pos`: int32 scalar, tokens consumed so far; `layers`: one entry per segment of the model
    (`CausalLM.segment_bounds`), its layers' states stacked on a leading axis: a lightning state
    `[n, B, N, Hk, Hv]` fp32 for TransNormer, `(keys, values)` `[n, B, max_len, K, H]` for softmax;
    `max_len` (static): the most tokens this cache may hold."""
    pos: jax.Array
    layers: tuple[Any, ...]
    max_len: int = dataclasses.field(metadata=dict(static=True))

    @property
    def batch_size(self) -> int:
        return jax.tree_util.tree_leaves(self.layers)[0].shape[1]
