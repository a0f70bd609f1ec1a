"""Per-op registry of implementations and the rule behind `implementation=None`.

Each op registers its backends by name ('reference', 'xla', 'pallas', 'triton', ...). A backend names the
platforms where `None` may pick it, a priority, and optionally a `supports(**op_args)` predicate for the
feature set it handles. Loaders are called lazily so kernel modules (and jax-triton) load only when used.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], Callable]
    platforms: tuple[str, ...] | None = None  # where `None` may choose it; any platform may ask for it by name
    priority: int = 0
    supports: Callable[..., bool] | None = None


_REGISTRY: dict[str, dict[str, Backend]] = {}


def module_available(name: str) -> bool:
    """Whether an optional dependency (e.g. jax-triton from the `gpu` extra) can be imported; one place to patch in tests."""
    return importlib.util.find_spec(name) is not None


def register(op: str, backend: Backend) -> None:
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def names(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, implementation: str | None, **op_args) -> Callable:
    """Returns the implementation function; a clear `ValueError` for unknown or unsupported requests."""
    backends = _REGISTRY[op]
    if implementation is not None:
        if implementation not in backends:
            raise ValueError(f"`implementation` for {op} must be one of {tuple(backends)} or None, got {implementation!r}")
        backend = backends[implementation]
        if backend.supports is not None and not backend.supports(**op_args):
            raise ValueError(f"implementation={implementation!r} of {op} does not support these arguments")
        return backend.load()
    platform = jax.default_backend()
    candidates = [
        b for b in backends.values()
        if (b.platforms is None or platform in b.platforms) and (b.supports is None or b.supports(**op_args))
    ]
    if not candidates:
        raise ValueError(f"no implementation of {op} supports these arguments on {platform}")
    return max(candidates, key=lambda b: b.priority).load()
