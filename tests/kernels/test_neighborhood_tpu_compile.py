"""Real Mosaic compiles (libtpu, deviceless) of the neighborhood-attention kernels, forward and backward in one
program, at production shapes for TPU v5e and v6e, reached through the public op with `implementation=None` (so
dispatch, at lowering time, must pick them): the three kernel calls are in the compiled program, the tiles follow
the generation of the mesh in context, and XLA's cost analysis includes the kernels' cost estimates."""
import os

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # test workers compiling side by side each load libtpu
pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn.kernels.common.verify import with_vjp  # noqa: E402
from jaxattn.kernels.neighborhood_attention import blocks  # noqa: E402
from jaxattn.testing.lowering import pallas_call_costs  # noqa: E402

TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2"}
KERNELS = ("neighborhood_attention_fwd", "neighborhood_attention_dq", "neighborhood_attention_dkv")
# name: (spatial, kernel, heads (N, K), head dim, options); batch 8, bf16
CASES = {
    "2d_56x56_k7_rpb": ((56, 56), 7, (4, 4), 32, dict(rpb=True)),
    "2d_56x56_k7_dil2": ((56, 56), 7, (4, 4), 32, dict(dilation=2)),
    "1d_8192_k13_causal_gqa": ((8192,), 13, (8, 2), 64, dict(causal=True)),
}


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def mesh(request):
    devices = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[request.param]).devices
    return request.param, jax.sharding.Mesh(np.array(devices[:1]), ("x",))


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_compile_for_tpu(mesh, name):
    generation, mesh = mesh
    spatial, kernel, (n, k), h, opts = CASES[name]
    nd = len(spatial)
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.P())

        def sds(shape, dtype=jnp.bfloat16):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        args = [sds((8, *spatial, n, h)), sds((8, *spatial, k, h)), sds((8, *spatial, k, h))]
        if opts.get("rpb"):
            args.append(sds((n,) + (2 * kernel - 1,) * nd, jnp.float32))
        cotangents = sds((8, *spatial, n, h))

        def fn(q, kk, v, *table):
            return jaxattn.neighborhood_attention(q, kk, v, kernel, dilation=opts.get("dilation", 1),
                                                  is_causal=opts.get("causal", False), rpb=table[0] if table else None)

        fwd_bwd = with_vjp(fn, range(len(args)))
        assert blocks.tpu_generation() == generation
        costs = pallas_call_costs(fwd_bwd, *args, cotangents, platform="tpu")
        compiled = jax.jit(fwd_bwd).trace(*args, cotangents).lower().compile()
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 3 and all(kname in text for kname in KERNELS)
    assert set(costs) == set(KERNELS)
    assert compiled.cost_analysis()["flops"] >= sum(c.flops for c in costs.values())
