"""The model side of context parallelism: which strategy each family may use, and when a layer uses it.

A family's constructor takes `context_parallel: str | None` (None: the single-device op everywhere). With a
strategy set, a layer calls the `jaxattn.context_parallel` function for it whenever the mesh in scope
(`jax.set_mesh`, as the training loop does) has a `'context'` axis of size > 1; otherwise, and always in prefill /
decoding, it calls the single-device op. So one model definition trains on any mesh, and `context = 1` is the
reference that `context > 1` must reproduce.

    family        strategies                     shards
    softmax_lm    'ring', 'allgather', 'ulysses'  the sequence (dim 1 of [B, T, N, H])
    transnormer   'lasp2'                        the sequence
    dinat         'halo'                         image rows (dim 1 of [B, H, W, N, D])
    halonet       'halo'                         image rows
"""
from __future__ import annotations

import jax

CONTEXT_AXIS = "context"

STRATEGIES: dict[str, tuple[str, ...]] = {
    "softmax_lm": ("ring", "allgather", "ulysses"),
    "transnormer": ("lasp2",),
    "dinat": ("halo",),
    "halonet": ("halo",),
}


def supported(family: str) -> tuple[str, ...]:
    """The strategies `family` accepts (empty for a family without context parallelism)."""
    return STRATEGIES.get(family, ())


def check_strategy(value, family: str) -> str | None:
    """`value` normalised (`''` -> None); `ValueError` naming `context_parallel` if `family` does not offer it."""
    if value is None or value == "":
        return None
    options = supported(family)
    if value not in options:
        offered = f"one of {options}" if options else "None (this family has no context-parallel strategy)"
        raise ValueError(f"`context_parallel` for {family} must be None or {offered}, got {value!r}")
    return value


def context_size(axis_name: str = CONTEXT_AXIS) -> int:
    """Size of `axis_name` in the mesh in scope (1 when there is no mesh or no such axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return int(dict(mesh.shape).get(axis_name, 1))


def active(strategy: str | None, axis_name: str = CONTEXT_AXIS) -> int:
    """The context size a layer with `strategy` shards over now: 0 when it should run the single-device op."""
    if strategy is None:
        return 0
    n = context_size(axis_name)
    return n if n > 1 else 0
