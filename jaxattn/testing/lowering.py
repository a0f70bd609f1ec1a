"""Lower a function for accelerators from this CPU-only machine (nothing runs) and check what it became.

Targets:
  'tpu'          -> Mosaic TPU custom call (`tpu_custom_call`)
  'mosaic_gpu'   -> Pallas Mosaic GPU (sm90+) custom call
  'triton'       -> Pallas Triton lowering (`__gpu$xla.gpu.triton`), needs `pallas.triton.CompilerParams`
  'cuda'         -> any CUDA lowering (plain XLA ops included)
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.extend

_PLATFORM = {"tpu": "tpu", "mosaic_gpu": "cuda", "triton": "cuda", "cuda": "cuda"}
_EXPECTED_CALL = {"tpu": "tpu_custom_call", "mosaic_gpu": "mosaic_gpu", "triton": "__gpu$xla.gpu.triton",
                  "cuda": None}


def _spec(x):
    return x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype)


def lowered_text(fn: Callable, *args, target: str = "tpu", static_argnums=()) -> str:
    """StableHLO text of `jit(fn)` lowered for `target` (args may be arrays or `ShapeDtypeStruct`s)."""
    specs = jax.tree.map(_spec, args)
    lowered = jax.jit(fn, static_argnums=static_argnums).trace(*specs).lower(
        lowering_platforms=(_PLATFORM[target],))
    return lowered.as_text()


def custom_calls(text: str) -> set[str]:
    return set(re.findall(r'custom_call @?"?([\w$.]+)', text))


def assert_lowers(fn: Callable, *args, targets: Sequence[str] = ("tpu",), static_argnums=()) -> dict[str, str]:
    """Asserts `fn(*args)` lowers for each target and, for kernel targets, contains that target's custom call."""
    texts = {}
    for target in targets:
        if target not in _PLATFORM:
            raise ValueError(f"`targets` entries must be in {tuple(_PLATFORM)}, got {target!r}")
        text = lowered_text(fn, *args, target=target, static_argnums=static_argnums)
        want = _EXPECTED_CALL[target]
        if want is not None and not any(want in c for c in custom_calls(text)):
            raise AssertionError(f"lowering for {target} has no {want!r} custom call; found {custom_calls(text)}")
        texts[target] = text
    return texts


def jaxpr_equations(fn: Callable, *args) -> list:
    """Every equation of the jaxpr of `fn(*args)`, recursing into jit, scan, checkpoint, custom_vjp, cond branches
    (so every platform's branch of a dispatched op) and other nested jaxprs (not into Pallas kernels): how tests check which primitives and dtypes a program really uses."""
    def eqns(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            if eqn.primitive.name == "pallas_call":
                continue
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):  # cond's branches
                    inner = getattr(item, "jaxpr", item)
                    if isinstance(inner, jax.extend.core.Jaxpr):
                        yield from eqns(inner)

    return list(eqns(jax.make_jaxpr(fn)(*args).jaxpr))


_KERNEL_PLATFORM = {"mosaic": "tpu", "triton": "gpu", "mosaic_gpu": "gpu"}


def kernel_platform(eqn) -> str | None:
    """'tpu' or 'gpu': which platform a `pallas_call` equation was built for (from its compiler parameters).

    A dispatched op stages one branch per lowering platform, so its jaxpr holds the TPU and the GPU kernels side
    by side; lowering keeps one of them."""
    params = eqn.params.get("compiler_params")
    module = type(params).__module__.split(".") if params is not None else ()
    return next((_KERNEL_PLATFORM[m] for m in reversed(module) if m in _KERNEL_PLATFORM), None)


def kernel_launches(fn: Callable, *args, platform: str | None = None) -> list:
    """Every `pallas_call` equation in the jaxpr of `fn(*args)` (nested jaxprs included, not kernels), only those
    built for `platform` ('tpu' / 'gpu') when given."""
    return [e for e in jaxpr_equations(fn, *args) if e.primitive.name == "pallas_call"
            and (platform is None or kernel_platform(e) == platform)]


def pallas_call_outputs(fn: Callable, *args, name: str) -> list[int]:
    """The output counts of every `pallas_call` named `name` in `fn(*args)`: how tests check what a backward
    actually computes."""
    return [len(e.outvars) for e in kernel_launches(fn, *args) if e.params.get("name") == name]


def pallas_call_costs(fn: Callable, *args, platform: str | None = None) -> dict:
    """`{name: pl.CostEstimate or None}` of the `pallas_call`s in `fn(*args)` (what XLA's cost analysis adds up),
    of the kernels built for `platform` ('tpu' / 'gpu') when given (a dispatched op holds both)."""
    return {e.params.get("name"): e.params.get("cost_estimate") for e in kernel_launches(fn, *args, platform=platform)}
