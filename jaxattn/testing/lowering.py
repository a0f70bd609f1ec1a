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
    """Every equation of the jaxpr of `fn(*args)`, recursing into jit, scan, checkpoint, custom_vjp and other
    nested jaxprs (not into Pallas kernels): how tests check which primitives and dtypes a program really uses."""
    def eqns(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if isinstance(inner, jax.extend.core.Jaxpr) and eqn.primitive.name != "pallas_call":
                    yield from eqns(inner)

    return list(eqns(jax.make_jaxpr(fn)(*args).jaxpr))


def _pallas_calls(fn: Callable, *args):
    """Every `pallas_call` equation in the jaxpr of `fn(*args)` (nested jaxprs included, not kernels)."""
    return [e for e in jaxpr_equations(fn, *args) if e.primitive.name == "pallas_call"]


def pallas_call_outputs(fn: Callable, *args, name: str) -> list[int]:
    """The output counts of every `pallas_call` named `name` in `fn(*args)`: how tests check what a backward
    actually computes."""
    return [len(e.outvars) for e in _pallas_calls(fn, *args) if e.params.get("name") == name]


def pallas_call_costs(fn: Callable, *args) -> dict:
    """`{name: pl.CostEstimate or None}` of the `pallas_call`s in `fn(*args)` (what XLA's cost analysis adds up)."""
    return {e.params.get("name"): e.params.get("cost_estimate") for e in _pallas_calls(fn, *args)}
