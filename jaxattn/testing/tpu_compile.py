"""Compile the flash and lightning kernels for a TPU generation with libtpu, deviceless, through the public ops.

One program holds every kernel, forward and backward (`verify.with_vjp`), reached the way a user reaches them:
`jaxattn.dot_product_attention` and `jaxattn.lightning_attention` with `implementation=None`, lowered for the TPU
devices of the mesh, so dispatch (at lowering time) must pick the Mosaic kernels. At the models' production shape
(T = 8192, d = 128, bf16): flash attention causal with GQA and segment ids, flash attention with a local window and
segment ids, lightning attention causal with decay; one compile covers all of them. `quick=True` compiles with
XLA's least execution-time optimisation effort (`exec_time_optimization_effort=-1`): Mosaic still compiles every
kernel and still refuses a plan that overflows VMEM (`CompileTimeScopedVmemOom`, checked), at about a quarter of
the compile time.
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
KERNEL_CALLS = 10  # flash, twice: fwd, dq, dk/dv; lightning: the forward scan, then dq (forward), dv and dk (reverse)
WINDOW = (1024, 0)  # the windowed flash call: each query sees itself and the 1024 keys before it
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
    import jaxattn
    from jaxattn.kernels.common import tpu
    from jaxattn.kernels.common.verify import with_vjp
    from jaxattn.kernels.flash_attention import blocks as flash_blocks
    from jaxattn.kernels.lightning_attention import blocks as scan_blocks
    from jaxattn.testing.lowering import kernel_launches

    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.P())

        def sds(shape, dtype=jnp.bfloat16):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        q, kv = sds((batch, length, heads, head_dim)), sds((batch, length, kv_heads, head_dim))
        lq = sds((batch, length, heads, head_dim))
        slopes = np.linspace(0.05, 0.5, heads, dtype=np.float32)  # numpy: no array on the deviceless devices
        # Two documents: the segment masks are built and cut the band, as in packed training.
        seg_ids = np.repeat(np.arange(2, dtype=np.int32), length // 2)[None].repeat(batch, 0)

        def fn(q, k, v, lq, lk, lv):
            out = jaxattn.dot_product_attention(q, k, v, query_segment_ids=seg_ids, key_segment_ids=seg_ids,
                                                is_causal=True)
            windowed = jaxattn.dot_product_attention(q, k, v, query_segment_ids=seg_ids, key_segment_ids=seg_ids,
                                                     local_window_size=WINDOW)
            lout, state = jaxattn.lightning_attention(lq, lk, lv, slopes=slopes, return_state=True)
            return out, windowed, lout, state

        args = (q, kv, kv, lq, lq, lq)
        cotangents = (q, q, lq, sds((batch, heads, head_dim, head_dim), jnp.float32))
        fwd_bwd = with_vjp(fn, range(len(args)))
        estimates = [e.params["cost_estimate"] for e in kernel_launches(fwd_bwd, *args, cotangents, platform="tpu")]
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

