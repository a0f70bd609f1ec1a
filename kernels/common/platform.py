"""Which Pallas target a kernel is built for, and the matching `pallas_call` options.

Kernel targets:
  'tpu'       -> Mosaic TPU (`pltpu.CompilerParams`, grid-pipelined reduction, VMEM scratch);
  'triton'    -> the Pallas-Triton GPU lowering (`pallas.triton.CompilerParams`, in-kernel loop);
  'interpret' -> `interpret=True`: runs anywhere (the only way on CPU), used by the tests;
  'tpu_interpret' -> `interpret=pltpu.InterpretParams()`: Mosaic TPU's own simulator on CPU, closer to the
                 hardware (output blocks are not read back from HBM, uninitialised memory is NaN); slower.

The target is chosen in Python when the kernel is traced, from `jax.default_backend()` unless given. Lowering
for another platform from this machine (tests) names the target explicitly.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax

TARGETS = ("tpu", "triton", "interpret", "tpu_interpret")
_BACKEND_TARGET = {"tpu": "tpu", "gpu": "triton", "cuda": "triton", "rocm": "triton"}


def resolve_target(target: str | None = None) -> str:
    """`None` -> the target for `jax.default_backend()` ('interpret' on CPU); otherwise checks the name."""
    if target is None:
        return _BACKEND_TARGET.get(jax.default_backend(), "interpret")
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS} or None, got {target!r}")
    return target


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
