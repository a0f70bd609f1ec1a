"""TPU compile section of `benchmarks/kernels.py` (`--tpu-compile`): the flash and lightning kernels compiled for
each TPU generation with libtpu, deviceless (no TPU needed; `jax[tpu]` installed).

Per generation (v4, v5e, v5p, v6e; the CI test compiles v5e and v6e): one program with every kernel forward and
backward (`jaxattn/testing/tpu_compile.py`: flash causal GQA 8/2 with segment ids, lightning causal with decay,
bf16, T = 8192, d = 128), compiled at XLA's full effort. Columns: whether it compiled, the block sizes the
generation's plan chose (`blocks.tpu_plan`: flash forward / dk/dv / dq as `bq x bk`, the lightning rows per
step), the VMEM one grid step holds by the plans' count (bf16 operands, with a bias tile and segment ids; the largest
of the three flash kernels) against the generation's budget (MiB), the
Mosaic kernel calls in the compiled program, the kernels' estimated GFLOP against XLA's cost analysis of the
whole program, and the compile time on this machine.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes here may hold libtpu

from jaxattn.kernels.common import tpu  # noqa: E402
from jaxattn.kernels.flash_attention import blocks as flash_blocks  # noqa: E402
from jaxattn.kernels.lightning_attention import blocks as scan_blocks  # noqa: E402

COLUMNS = ["generation", "compiled", "flash_fwd", "flash_dkv", "flash_dq", "flash_vmem_MiB", "lightning_block",
           "lightning_vmem_MiB", "budget_MiB", "kernel_calls", "estimated_GFLOP", "xla_GFLOP", "compile_s", "error"]
HEAD_DIM = 128


def plan_row(generation: str) -> dict:
    """The blocks and VMEM counts of `generation`'s plans (pure Python)."""
    sizes = flash_blocks.tpu_plan(generation, HEAD_DIM)
    scan = scan_blocks.tpu_plan(generation, HEAD_DIM)
    flash_vmem = max(flash_blocks.vmem_bytes(phase, bq, bk, HEAD_DIM, itemsize=2)
                     for phase, bq, bk in zip(("fwd", "dkv", "dq"), sizes.q_blocks, sizes.k_blocks))
    return {"generation": generation, "flash_fwd": f"{sizes.block_q}x{sizes.block_k}",
            "flash_dkv": f"{sizes.block_q_dkv}x{sizes.block_k_dkv}",
            "flash_dq": f"{sizes.block_q_dq}x{sizes.block_k_dq}",
            "flash_vmem_MiB": flash_vmem / tpu.MiB,
            "lightning_block": scan.block,
            "lightning_vmem_MiB": scan_blocks.vmem_bytes(scan.block, HEAD_DIM, HEAD_DIM, itemsize=2) / tpu.MiB,
            "budget_MiB": tpu.plan(generation).vmem_budget_bytes / tpu.MiB}


def rows(generations=tuple(tpu.GENERATIONS)) -> list[dict]:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return [dict(plan_row(g), compiled="libtpu not installed") for g in generations]
    from jaxattn.testing.tpu_compile import KERNEL_CALLS, compile_kernels, single_device_mesh
    out = []
    for generation in generations:
        row = plan_row(generation)
        start = time.perf_counter()
        try:
            result = compile_kernels(single_device_mesh(generation), head_dim=HEAD_DIM)
        except Exception as err:  # a plan this generation refuses is the finding
            row.update(compiled="no", error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        else:
            ok = result.kernel_calls == KERNEL_CALLS and not result.missing and result.generation == generation
            row.update(compiled="yes" if ok else f"partly (missing {result.missing})",
                       kernel_calls=result.kernel_calls, estimated_GFLOP=result.estimated_flops / 1e9,
                       xla_GFLOP=result.xla_flops / 1e9)
        row["compile_s"] = time.perf_counter() - start
        out.append(row)
    return out
