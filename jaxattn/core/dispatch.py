"""Per-op registry of implementations, and the one place that looks at the platform.

Each op registers its backends by name ('reference', 'xla', 'pallas', 'triton', ...). A backend says where
`implementation=None` may pick it (`platforms`), where it can run at all (`runs_on`), its priority, an optional
`supports(**op_args)` predicate for the arguments it handles, and whether it is a Pallas kernel that takes the
kernel `target` of the platform (`takes_target`). Loaders are called lazily, so kernel modules (and jax-triton)
load only when a program uses them.

The choice is made for the platform the program is *lowered* for, not the one this process runs on: `call` stages
one branch per distinct choice with `jax.lax.platform_dependent`, and lowering keeps only the branch of its
platform. One traced program lowered for tpu, cuda and cpu therefore gets the Mosaic kernel, the GPU kernel and
the XLA path, whether it is run here, compiled ahead of time for a TPU slice from a CPU host (`train.aot`) or
serialised with `jax.export`. A backend asked for by name that cannot run on the lowering platform fails that
lowering with a `ValueError` naming the op, the backend and the platform (never a silent fallback).

`explain(fn, *args, **kwargs)` traces `fn` abstractly and says, per op call and platform, which backend was
chosen and why the ones above it were skipped; the same lines go to the `jaxattn.dispatch` logger at DEBUG.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import threading
from collections.abc import Callable

import jax
from jax.extend import core as jex_core
from jax.interpreters import mlir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # the lowering platforms a choice is made for
KERNEL_TARGETS = {"cpu": "interpret", "cuda": "triton", "rocm": "triton", "tpu": "tpu"}
_FAMILY = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}

log = logging.getLogger("jaxattn.dispatch")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], Callable]
    platforms: tuple[str, ...] | None = None  # where `None` may choose it ('cpu', 'gpu', 'tpu', 'cuda', 'rocm')
    priority: int = 0
    supports: Callable[..., bool] | None = None  # its docstring's first line is the reason given when it refuses
    runs_on: tuple[str, ...] | None = None  # where it can run at all when asked for by name; None: everywhere
    takes_target: bool = False  # a Pallas kernel: called with `target=KERNEL_TARGETS[platform]`


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one op call gets on one lowering platform."""
    platform: str
    backend: str | None  # None: nothing can run there (`error` says why)
    target: str | None = None  # the kernel target for Pallas backends
    skipped: tuple[tuple[str, str], ...] = ()  # (backend, reason) for the better-ranked ones passed over
    error: str | None = None

    def line(self, op: str) -> str:
        what = self.error if self.backend is None else (
            self.backend + (f" (target {self.target!r})" if self.target else ""))
        skipped = "; ".join(f"{name}: {why}" for name, why in self.skipped)
        return f"{op} on {self.platform}: {what}" + (f"  [skipped {skipped}]" if skipped else "")


_REGISTRY: dict[str, dict[str, Backend]] = {}
_RECORDING = threading.local()


def module_available(name: str) -> bool:
    """Whether an optional dependency (e.g. jax-triton from the `gpu` extra) can be imported; one place to patch in tests."""
    return importlib.util.find_spec(name) is not None


def register(op: str, backend: Backend) -> None:
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def names(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def _allowed(where: tuple[str, ...] | None, platform: str) -> bool:
    return where is None or platform in where or _FAMILY[platform] in where


def _refusal(backend: Backend, op_args) -> str | None:
    if backend.supports is None or backend.supports(**op_args):
        return None
    doc = (backend.supports.__doc__ or "").strip()
    return doc.split(". ")[0].split("\n\n")[0].replace("\n", " ").rstrip(".") or "does not support these arguments"


def _choice(backend: Backend, platform: str, skipped=()) -> Choice:
    return Choice(platform, backend.name, KERNEL_TARGETS[platform] if backend.takes_target else None, tuple(skipped))


def plan(op: str, implementation: str | None, **op_args) -> dict[str, Choice]:
    """The choice for every lowering platform. `ValueError` now for an unknown name, or when nothing can run
    these arguments anywhere."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered: {tuple(_REGISTRY)}")
    backends = _REGISTRY[op]
    if implementation is not None:
        if implementation not in backends:
            raise ValueError(f"`implementation` for {op} must be one of {tuple(backends)} or None, got {implementation!r}")
        backend = backends[implementation]
        refusal = _refusal(backend, op_args)
        if refusal is not None:
            raise ValueError(f"implementation={implementation!r} of {op} does not support these arguments: {refusal}")
        return {p: _choice(backend, p) if _allowed(backend.runs_on, p) else Choice(
            p, None, error=f"implementation={implementation!r} of {op} cannot run on {p} (it runs on "
                           f"{', '.join(backend.runs_on)}); ask for another implementation or None")
                for p in PLATFORMS}
    out = {}
    for platform in PLATFORMS:
        skipped = []
        for backend in sorted(backends.values(), key=lambda b: -b.priority):
            if not _allowed(backend.platforms, platform) or not _allowed(backend.runs_on, platform):
                continue
            refusal = _refusal(backend, op_args)
            if refusal is None:
                out[platform] = _choice(backend, platform, skipped)
                break
            skipped.append((backend.name, refusal))
        else:
            out[platform] = Choice(platform, None, skipped=tuple(skipped),
                                   error=f"no implementation of {op} supports these arguments on {platform}")
    if all(c.backend is None for c in out.values()):
        raise ValueError(out["cpu"].error.replace(" on cpu", "") + ": " +
                         "; ".join(f"{n}: {w}" for n, w in out["cpu"].skipped))
    return out


def resolve(op: str, implementation: str | None, *, platform: str = "cpu", **op_args) -> Callable:
    """The loaded function the op runs on `platform` (kernel target bound); for tests and tools."""
    choice = plan(op, implementation, **op_args)[platform]
    if choice.backend is None:
        raise ValueError(choice.error)
    return _loaded(op, choice.backend, choice.target)


@functools.lru_cache(maxsize=None)
def _loaded(op: str, name: str, target: str | None) -> Callable:
    fn = _REGISTRY[op][name].load()
    if target is None:
        return fn
    bound = functools.partial(fn, target=target)
    bound.backend_name = getattr(fn, "backend_name", name)
    bound.__name__ = getattr(fn, "__name__", name)
    return bound


def call(op: str, implementation: str | None, body: Callable, *args, **op_args):
    """`body(impl, *args)` with the implementation chosen for the lowering platform.

    `args` are the traced arrays (pytrees, None allowed); everything static goes in `body`'s closure. When every
    platform gets the same function, `body` is traced once; otherwise once per distinct choice, under
    `jax.lax.platform_dependent`.
    """
    choices = plan(op, implementation, **op_args)
    for choice in choices.values():
        log.debug("%s", choice.line(op))
    recording = getattr(_RECORDING, "calls", None)
    if recording is not None:
        recording.append((op, choices))
    runnable = {p: c for p, c in choices.items() if c.backend is not None}
    keys = {(c.backend, c.target) for c in runnable.values()}
    if len(keys) == 1 and len(runnable) == len(choices):
        return body(_loaded(op, *keys.pop()), *args)
    branches = {}
    for platform, choice in runnable.items():
        branches[platform] = _branch(body, _loaded(op, choice.backend, choice.target))
    failing = {p: c for p, c in choices.items() if c.backend is None}
    if failing:
        shape = jax.eval_shape(next(iter(branches.values())), *args)
        for platform, choice in failing.items():
            branches[platform] = _failing_branch(choice.error, shape)
    # identical choices share one branch object, which platform_dependent joins
    shared: dict[tuple, Callable] = {}
    for platform in list(branches):
        choice = choices[platform]
        key = (choice.backend, choice.target) if choice.backend else ("error", choice.error)
        branches[platform] = shared.setdefault(key, branches[platform])
    return jax.lax.platform_dependent(*args, **branches)


def _branch(body, impl):
    return lambda *a: body(impl, *a)


# A primitive whose lowering raises: the branch of a platform where the requested backend cannot run.
_unavailable_p = jex_core.Primitive("jaxattn_unavailable_backend")
_unavailable_p.multiple_results = True
_unavailable_p.def_abstract_eval(lambda *_, avals, message: avals)


def _unavailable_lowering(ctx, *_, avals, message):
    raise ValueError(message)


mlir.register_lowering(_unavailable_p, _unavailable_lowering)


def _failing_branch(message: str, shape):
    leaves, tree = jax.tree.flatten(shape)
    avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in leaves)

    def branch(*_):
        return jax.tree.unflatten(tree, _unavailable_p.bind(avals=avals, message=message))
    return branch


@contextlib.contextmanager
def recording():
    """Collects `(op, {platform: Choice})` for every op call traced inside."""
    previous = getattr(_RECORDING, "calls", None)
    _RECORDING.calls = []
    try:
        yield _RECORDING.calls
    finally:
        _RECORDING.calls = previous


def explain(fn: Callable, *args, platforms: tuple[str, ...] = PLATFORMS, **kwargs) -> str:
    """Which backend every op call in `fn(*args, **kwargs)` gets on each platform, and why (traced abstractly:
    nothing runs). One line per op call and platform, e.g.
    `dot_product_attention on cpu: xla  [skipped triton: needs jax-triton ...; pallas: ...]`."""
    with recording() as calls:
        jax.eval_shape(functools.partial(fn, **kwargs), *args)
    lines = []
    for op, choices in calls:
        lines.extend(choices[p].line(op) for p in platforms)
    return "\n".join(lines)
