"""Which Pallas target a kernel is built for, and the matching `pallas_call` options.

Kernel targets:
  'tpu'       -> Mosaic TPU (`pltpu.CompilerParams`, grid-pipelined reduction, VMEM scratch);
  'triton'    -> the Pallas-Triton GPU lowering (`pallas.triton.CompilerParams`, in-kernel loop);
  'interpret' -> `interpret=True`: runs anywhere (the only way on CPU), used by the tests;
  'tpu_interpret' -> `interpret=pltpu.InterpretParams()`: Mosaic TPU's own simulator on CPU, closer to the
                 hardware (output blocks are not read back from HBM, uninitialised memory is NaN); slower.

A kernel entry point decorated with `lowering_target` and called with `target=None` is staged once per target
under `jax.lax.platform_dependent`, so the target follows the platform the program is lowered for (a program
traced here and compiled for a TPU slice gets 'tpu'), never `jax.default_backend()`. The ops' dispatch
(`jaxattn.core.dispatch`) passes the target itself.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax

from jaxattn.core.dispatch import KERNEL_TARGETS

TARGETS = ("tpu", "triton", "interpret", "tpu_interpret")
LOWERING_TARGETS = KERNEL_TARGETS  # lowering platform -> kernel target, the one table in core.dispatch


def resolve_target(target: str) -> str:
    """Checks a target name (entry points resolve None with `lowering_target`)."""
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS} (or None at a kernel's entry point), got {target!r}")
    return target


def lowering_target(fn: Callable) -> Callable:
    """`fn(..., target=None)` -> `fn(..., target=LOWERING_TARGETS[platform])` for the lowering platform (the
    arrays are closed over: `platform_dependent` hoists them into the branches' operands)."""

    @functools.wraps(fn)
    def wrapper(*args, target=None, **kwargs):
        if target is not None:
            return fn(*args, target=target, **kwargs)
        runs = {t: functools.partial(fn, *args, target=t, **kwargs) for t in dict.fromkeys(LOWERING_TARGETS.values())}
        return jax.lax.platform_dependent(**{p: runs[t] for p, t in LOWERING_TARGETS.items()})
    return wrapper


def interpret(target: str):
    """The `interpret` argument of `pallas_call` for `target`."""
    if target == "tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.InterpretParams(uninitialized_memory="nan")
    return target == "interpret"


def tpu_like(target: str) -> bool:
    """Targets with Mosaic TPU's rules (tile alignment, grid-pipelined reductions)."""
    return target in ("tpu", "tpu_interpret")


def compiler_params(target: str, *, dimension_semantics: Sequence[str] = (), num_warps: int | None = None,
                    num_stages: int | None = None, vmem_limit_bytes: int | None = None):
    """Backend-specific `compiler_params` for `pallas_call` (None in interpret mode).

    `dimension_semantics` names each grid axis 'parallel' or 'arbitrary' (TPU only: the sequential reduction axis
    must be 'arbitrary'); `num_warps`/`num_stages` apply to Triton only.
    """
    if tpu_like(target):
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics),
                                    vmem_limit_bytes=vmem_limit_bytes)
    if target == "triton":
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return None
