"""Compile the flash and lightning kernels for a TPU generation with libtpu, deviceless, and report what came out.

One program holds every kernel, forward and backward (`verify.with_vjp`): flash attention causal with GQA and
segment ids, lightning attention causal with decay, bf16, at the models' production shape (T = 8192, d = 128),
so one compile covers all of them. `quick=True` compiles with XLA's least execution-time optimisation effort
(`exec_time_optimization_effort=-1`): Mosaic still compiles every kernel and still refuses a plan that overflows
VMEM (`CompileTimeScopedVmemOom`, checked), at about a quarter of the compile time.
Used by `tests/kernels/test_kernel_blocks_tpu_compile.py` (v5e, v6e) and `benchmarks/kernels.py --tpu-compile`
(all four generations). Needs `jax[tpu]` (libtpu) installed and
`ALLOW_MULTIPLE_LIBTPU_LOAD=1` where several processes load it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv", "lightning_scan",
           "lightning_scan_reverse")
KERNEL_CALLS = 7  # flash: fwd, dq, dk/dv; lightning: the forward scan, then dq (forward), dv and dk (reverse)
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@dataclasses.dataclass(frozen=True)
class CompileResult:
    generation: str | None
    flash_blocks: object
    lightning_blocks: object
    kernel_calls: int  # `tpu_custom_call`s in the compiled program
    missing: tuple[str, ...]  # kernel names not found in it
    estimated_flops: int  # sum of the kernels' cost estimates
    xla_flops: float  # XLA's cost analysis of the whole program
    temp_bytes: int  # HBM temporaries of the program (memory analysis)


def single_device_mesh(generation: str) -> jax.sharding.Mesh:
    """A one-device mesh of the deviceless topology of `generation` (its devices carry the device kind)."""
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[generation]).devices
    return jax.sharding.Mesh(np.array(devices[:1]), ("x",))


def compile_kernels(mesh: jax.sharding.Mesh, *, length: int = 8192, head_dim: int = 128, heads: int = 8,
                    kv_heads: int = 2, batch: int = 1, quick: bool = False) -> CompileResult:
    """Compiles the kernels for the devices of `mesh` (in context, so the blocks follow its generation)."""
    from jaxattn.kernels.common import tpu
    from jaxattn.kernels.common.verify import with_vjp
    from jaxattn.kernels.flash_attention import blocks as flash_blocks
    from jaxattn.kernels.flash_attention import pallas as flash
    from jaxattn.kernels.lightning_attention import blocks as scan_blocks
    from jaxattn.kernels.lightning_attention import pallas as lightning
    from jaxattn.testing.lowering import jaxpr_equations

    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.P())

        def sds(shape, dtype=jnp.bfloat16):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        q, kv = sds((batch, length, heads, head_dim)), sds((batch, length, kv_heads, head_dim))
        lq = sds((batch, length, heads, head_dim))
        slopes = np.linspace(0.05, 0.5, heads, dtype=np.float32)  # numpy: no array on the deviceless devices

        def fn(q, k, v, lq, lk, lv):
            out, _ = flash.flash_attention(q, k, v, q_segment_ids=seg_ids, k_segment_ids=seg_ids, is_causal=True,
                                           target="tpu")
            lout, state = lightning.lightning_attention(lq, lk, lv, slopes, target="tpu")
            return out, lout, state

        seg_ids = np.zeros((batch, length), np.int32)  # one segment: the masks are built, nothing is cut
        args = (q, kv, kv, lq, lq, lq)
        cotangents = (q, lq, sds((batch, heads, head_dim, head_dim), jnp.float32))
        fwd_bwd = with_vjp(fn, range(len(args)))
        estimates = [e.params["cost_estimate"] for e in jaxpr_equations(fwd_bwd, *args, cotangents)
                     if e.primitive.name == "pallas_call"]
        options = {"exec_time_optimization_effort": -1.0} if quick else None
        compiled = jax.jit(fwd_bwd).trace(*args, cotangents).lower().compile(compiler_options=options)
        generation = tpu.current_generation()
        sizes = flash_blocks.fit("tpu", length, length, head_dim=head_dim)
        scan = scan_blocks.fit("tpu", length, head_dim=head_dim)
    text = compiled.as_text()
    return CompileResult(
        generation=generation, flash_blocks=sizes, lightning_blocks=scan,
        kernel_calls=text.count('custom_call_target="tpu_custom_call"'),
        missing=tuple(name for name in KERNELS if name not in text),
        estimated_flops=sum(e.flops for e in estimates if e is not None),
        xla_flops=float(compiled.cost_analysis()["flops"]),
        temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes))
