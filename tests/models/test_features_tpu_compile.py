"""Feature backbones on a pod: every vision family's `features_only` model compiles with the real TPU compiler
(libtpu, deviceless) for a v5e:2x2 slice with the batch split over its four chips, as `train.aot` compiles a train
step, with the attention kernels in the program (run per shard), and every feature comes back split by batch like
the input."""
import os

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # test workers compiling side by side each load libtpu
pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxattn import models  # noqa: E402

FAMILIES = ("maxvit_pico", "halonet_pico", "dinat_pico", "biformer_pico")
WITH_KERNELS = FAMILIES  # every family's attention picks a Pallas kernel on TPU


@pytest.fixture(scope="module")
def mesh():
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    return jax.sharding.Mesh(np.array(devices), ("data",))


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_model_compiles_for_tpu_sharded_by_batch(mesh, name):
    model = nnx.eval_shape(lambda: models.create_model(name, features_only=True, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(mesh, P())
    by_batch = NamedSharding(mesh, P("data"))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32, sharding=by_batch)

    def features(state, images):
        return nnx.merge(graphdef, state)(images)

    compiled = jax.jit(features).trace(state, images).lower().compile()
    if name in WITH_KERNELS:  # the Mosaic kernels run per shard (`kernels/common/partition.py`), not replaced
        assert 'custom_call_target="tpu_custom_call"' in compiled.as_text(), name
    outputs = compiled.output_shardings
    assert len(outputs) == len(model.feature_info)
    for sharding, shape in zip(outputs, compiled.out_info):
        assert shape.shape[0] == 8
        assert sharding.is_equivalent_to(by_batch, len(shape.shape)), (name, sharding)
