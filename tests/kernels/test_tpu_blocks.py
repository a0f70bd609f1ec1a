"""The TPU generation table (`kernels/common/tpu.py`): device kinds, the generation of the mesh in context."""
import os

import numpy as np
import pytest

from jaxattn.kernels.common import tpu


@pytest.mark.parametrize("kind, name", [("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
                                        ("TPU v5", "v5p"), ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"),
                                        ("TPU v6e", "v6e"), ("TPU v4 lite", None), ("TPU7x", None), ("cpu", None)])
def test_generation_of_device_kind(kind, name):
    assert tpu.generation_of(kind) == name


def test_plans():
    assert tpu.plan("v6e").mxu == 256 and {tpu.plan(g).mxu for g in ("v4", "v5e", "v5p")} == {128}
    assert tpu.plan().name == "unknown"  # CPU host, no TPU mesh in context
    for g in (*tpu.GENERATIONS.values(), tpu.UNKNOWN):
        assert g.vmem_budget_bytes < g.scoped_vmem_bytes <= g.vmem_limit_bytes <= g.vmem_bytes
    assert tpu.UNKNOWN.vmem_limit_bytes <= min(g.scoped_vmem_bytes for g in tpu.GENERATIONS.values())
    with pytest.raises(ValueError, match="generation"):
        tpu.plan("v7")


def test_current_generation_follows_the_mesh():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    pytest.importorskip("libtpu")
    import jax
    from jax.experimental import topologies
    for name, topology in (("v5e", "v5e:2x2"), ("v6e", "v6e:2x2")):
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
        with jax.set_mesh(jax.sharding.Mesh(np.array(devices[:1]), ("x",))):
            assert tpu.current_generation() == name and tpu.plan().name == name


@pytest.mark.parametrize("generation", [*tpu.GENERATIONS, None])
def test_block_plans_fit_vmem(generation):
    """The flash and lightning TPU plans are the table's up to the models' head dims and shrink to the budget
    beyond (pure Python: the worst-case VMEM count of one grid step against the generation's budget)."""
    from jaxattn.kernels.flash_attention import blocks as flash_blocks
    from jaxattn.kernels.lightning_attention import blocks as scan_blocks
    plan = tpu.plan(generation)
    for head_dim in (64, 128, 256):
        assert flash_blocks.tpu_plan(generation, head_dim) == flash_blocks.TPU_PLANS[plan.name]
        assert scan_blocks.tpu_plan(generation, head_dim) == scan_blocks.TPU_PLANS[plan.name]
    for head_dim in (128, 1024):
        sizes = flash_blocks.tpu_plan(generation, head_dim)
        for phase, bq, bk in zip(("fwd", "dkv", "dq"), sizes.q_blocks, sizes.k_blocks):
            assert flash_blocks.vmem_bytes(phase, bq, bk, head_dim) <= plan.vmem_budget_bytes
            assert bq % plan.mxu == 0 and bk % plan.mxu == 0 or plan.mxu > tpu.LANES
        scan = scan_blocks.tpu_plan(generation, head_dim)  # past 128 rows: state columns split
        assert scan_blocks.vmem_bytes(scan.block, head_dim, scan.value_tile or head_dim) <= plan.vmem_budget_bytes
    assert flash_blocks.tpu_plan(generation, 1024) != flash_blocks.TPU_PLANS[plan.name]
