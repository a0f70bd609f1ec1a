"""The model side of context parallelism: one mechanism every family's attention layer calls.

A family's constructor takes `context_parallel: str | None` (None: the single-device op everywhere) and its
attention layer calls `attention(op, strategy, *args, **kwargs)` where it would call `jaxattn.<op>(...)`. That runs
the `jaxattn.context_parallel` function of `strategy` whenever the mesh in scope (`jax.set_mesh`, as the training
loop does) has a `'context'` axis of size > 1 and the strategy accepts the shapes over it; otherwise, and in
prefill / decoding (which call the ops directly), the single-device op. So one model definition trains on any mesh,
`context = 1` is the reference that `context > 1` must reproduce, and a new family adds a row to `FAMILY_OPS`,
not a branch.

    op                       strategy    function                          shards
    dot_product_attention    'ring'      ring_attention                    the sequence (dim 1 of [B, T, N, H])
                             'allgather' allgather_attention
                             'ulysses'   ulysses_attention
    lightning_attention      'lasp2'     lasp2_lightning_attention         the sequence
    neighborhood_attention   'halo'      halo_neighborhood_attention       image rows, when every shard holds the
                                                                           border rows its neighbours' windows need
    halo_attention           'halo'      halo_exchange_halo_attention      image rows, in whole blocks of at least
                                                                           `halo_size` rows per shard
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import jax

CONTEXT_AXIS = "context"


@dataclasses.dataclass(frozen=True)
class Strategy:
    """`function` of `jaxattn.context_parallel` replaces the op; `accepts(devices, *args, **kwargs)` says whether
    the call's shapes shard over `devices` (None: always; the function raises on shapes it cannot take);
    `drops`: keyword arguments of the op the function does not take."""
    function: str
    accepts: Callable[..., bool] | None = None
    drops: tuple[str, ...] = ()


def _neighborhood_rows(devices, query, key, value, kernel_size, *, dilation=1, is_causal=False, **_):
    from jaxattn.context_parallel.halo_exchange import neighborhood_shardable
    first = (lambda v: v if isinstance(v, int) else tuple(v)[0])
    return neighborhood_shardable(query.shape[1], devices, first(kernel_size), first(dilation), bool(first(is_causal)))


def _halo_rows(devices, query, key, value, block_size, halo_size, **_):
    from jaxattn.context_parallel.halo_exchange import halo_attention_shardable
    return halo_attention_shardable(key.shape[1], devices, block_size, halo_size)


STRATEGIES: dict[str, dict[str, Strategy]] = {
    "dot_product_attention": {"ring": Strategy("ring_attention"), "allgather": Strategy("allgather_attention"),
                              "ulysses": Strategy("ulysses_attention")},
    "lightning_attention": {"lasp2": Strategy("lasp2_lightning_attention")},
    "neighborhood_attention": {"halo": Strategy("halo_neighborhood_attention", _neighborhood_rows)},
    "halo_attention": {"halo": Strategy("halo_exchange_halo_attention", _halo_rows, drops=("implementation",))},
}

# The op each family's attention layers run over the whole input (what context parallelism replaces).
FAMILY_OPS: dict[str, str] = {
    "softmax_lm": "dot_product_attention",
    "transnormer": "lightning_attention",
    "dinat": "neighborhood_attention",
    "halonet": "halo_attention",
}


def supported(family: str) -> tuple[str, ...]:
    """The strategies `family` accepts (empty for a family without context parallelism)."""
    return tuple(STRATEGIES.get(FAMILY_OPS.get(family, ""), {}))


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


def strategy_function(op: str, strategy: str | None, *args, **kwargs) -> Callable | None:
    """The `jaxattn.context_parallel` function that `attention(op, strategy, *args, **kwargs)` calls now (its
    dropped keywords already bound away), or None when it calls the single-device op."""
    if op not in STRATEGIES:
        raise ValueError(f"`op` must be one of {tuple(STRATEGIES)}, got {op!r}")
    n = active(strategy)
    if not n:
        return None
    if strategy not in STRATEGIES[op]:
        raise ValueError(f"`context_parallel` {strategy!r} has no version of {op}; it offers "
                         f"{tuple(STRATEGIES[op])}")
    plan = STRATEGIES[op][strategy]
    if plan.accepts is not None and not plan.accepts(n, *args, **kwargs):
        return None
    fn = getattr(importlib.import_module("jaxattn.context_parallel"), plan.function)
    if not plan.drops:
        return fn
    return lambda *a, **kw: fn(*a, **{k: v for k, v in kw.items() if k not in plan.drops})


def attention(op: str, strategy: str | None, *args, **kwargs):
    """`jaxattn.<op>(*args, **kwargs)`, or its `strategy` over the context axis when that is on and accepts the
    shapes (`strategy_function`). Same arguments and results either way."""
    fn = strategy_function(op, strategy, *args, **kwargs)
    if fn is None:
        fn = getattr(importlib.import_module("jaxattn"), op)
    return fn(*args, **kwargs)
