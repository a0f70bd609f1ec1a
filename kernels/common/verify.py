"""Checking kernels without the hardware they target: lowering of forward + backward, and the Triton harness.

- `with_vjp(fn, argnums)`: a function `(*args, cotangents) -> (outputs, grads)`, so one `assert_lowers` of it
  covers the forward kernels and the backward kernels (the custom VJP) for 'tpu' or 'triton'.
- `triton_compile(kernel, signature, constexprs, arch)`: PTX and cubin of a `@triton.jit` kernel for `sm_<arch>`
  with no GPU present (`triton.compile` on an `ASTSource`).
- `run_triton_interpreted(code)`: runs Python `code` in a child process with `TRITON_INTERPRET=1` (it must be set
  before `triton` is imported, so it cannot be toggled inside a test process); the kernels then run on the CPU
  with torch CPU tensors.
- `install_interpreted_jax_triton()` (in such a child): a stand-in `jax_triton` module whose `triton_call` runs
  the kernel in the interpreter through `jax.pure_callback`, so a kernel's whole JAX launcher (layouts, custom
  VJP, launch plans) is tested end to end on the CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Sequence

import jax
import numpy as np


def with_vjp(fn: Callable, argnums: Sequence[int]) -> Callable:
    """`g(*args, cotangents)` returning `(fn(*args), grads w.r.t. args[argnums])` through `jax.vjp`."""
    argnums = tuple(argnums)

    def fwd_bwd(*args_and_cotangents):
        *args, cotangents = args_and_cotangents

        def partial_fn(*diff):
            full = list(args)
            for i, x in zip(argnums, diff):
                full[i] = x
            return fn(*full)

        out, vjp = jax.vjp(partial_fn, *(args[i] for i in argnums))
        return out, vjp(cotangents)

    return fwd_bwd


def triton_available() -> str | None:
    """None when `triton` and `torch` import, else the reason (tests skip with it)."""
    for name in ("triton", "torch"):
        try:
            __import__(name)
        except ImportError as err:  # pragma: no cover - depends on the environment
            return f"{name} is not installed ({err}); pip install 'jaxattn[gpu,crosscheck]'"
    return None


def triton_compile(kernel, signature: dict[str, str], constexprs: dict[str, object], arch: int, *,
                   num_warps: int = 4, num_stages: int = 2):
    """Compiles `kernel` for CUDA `sm_<arch>` without a GPU; returns the `CompiledKernel` (`.asm['cubin']`,
    `.asm['ptx']`, `.metadata`). `signature` maps argument names to Triton types ('*bf16', 'i32', 'constexpr')."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile

    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs))
    return tcompile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                       "num_stages": num_stages})


def run_triton_interpreted(code: str, *, timeout: float = 600, cwd: str | None = None) -> str:
    """Runs `code` with `TRITON_INTERPRET=1` in a fresh interpreter; returns stdout, raises with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"Triton interpreter run failed (rc {proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout


def _to_torch(x):
    import torch
    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":  # numpy has no bf16: move the bits
        return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _from_torch(t, dtype):
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.dtype(dtype))
    return t.numpy().astype(dtype)


def interpreted_triton_call(*args, kernel, out_shape, grid, num_warps=None, num_stages=None, name="",
                            zeroed_outputs=(), input_output_aliases=None, **metaparams):
    """`jax_triton.triton_call`'s signature, run by the Triton interpreter on the host (TRITON_INTERPRET=1).

    Outputs start zeroed (a superset of `zeroed_outputs`); aliasing is not supported.
    """
    del num_warps, num_stages, name, zeroed_outputs
    if input_output_aliases:
        raise NotImplementedError("input_output_aliases in the interpreted triton_call")
    multiple = isinstance(out_shape, (list, tuple))
    shapes = list(out_shape) if multiple else [out_shape]
    shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes]
    grid = grid(metaparams) if callable(grid) else grid

    def host(*arrays):
        import torch
        ins = [_to_torch(np.asarray(a)) for a in arrays]
        outs = [torch.zeros(s.shape, dtype=_to_torch(np.zeros((), s.dtype)).dtype) for s in shapes]
        kernel[tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)](*ins, *outs, **metaparams)
        return [_from_torch(o, s.dtype) for o, s in zip(outs, shapes)]

    outs = jax.pure_callback(host, shapes, *args)
    return list(outs) if multiple else outs[0]


def patch_interpreter_bf16_dot() -> None:
    """Triton 3.9's interpreter keeps bf16 tensors as their uint16 bits and `tl.dot` multiplies those bits
    (garbage). Hardware computes bf16 products exactly in fp32, so the patch upcasts bf16 operands to fp32 first."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_jaxattn_bf16_dot", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        import triton.language as tl
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._jaxattn_bf16_dot = True


def install_interpreted_jax_triton() -> None:
    """Registers a stand-in `jax_triton` module backed by `interpreted_triton_call` (child processes only)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("install_interpreted_jax_triton needs TRITON_INTERPRET=1 set before triton is imported")
    patch_interpreter_bf16_dot()
    module = types.ModuleType("jax_triton")
    module.triton_call = interpreted_triton_call
    sys.modules["jax_triton"] = module
