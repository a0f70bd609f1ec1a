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
