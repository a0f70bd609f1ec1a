"""Pieces of the training loop on their own: mesh sizes, parameter and batch shardings, the optimizer, the RNG
re-seeding, the metrics files."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxattn.configs import base
from jaxattn.train import metrics, optimizer, sharding
from jaxattn.train import state as state_lib


@pytest.mark.parametrize("axes,devices,expected", [
    ({"data": -1, "fsdp": 1, "context": 1}, 8, {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}),
    ({"context": 2, "data": -1, "fsdp": 2}, 8, {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}),
    ({"tensor": 2, "data": 1, "fsdp": -1, "context": 1}, 8, {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}),
    ({"data": 2, "fsdp": -1, "context": 1}, 8, {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}),  # older configs
])
def test_mesh_sizes(axes, devices, expected):
    sizes = sharding.resolve_mesh_sizes(axes, devices)
    assert sizes == expected and list(sizes) == list(expected)  # data, fsdp, context first


@pytest.mark.parametrize("axes,message", [
    ({"data": -1, "fsdp": -1, "context": 1}, "at most one -1"),
    ({"data": 3, "fsdp": 1, "context": 1}, "needs 3 devices, but there are 8"),
    ({"data": -1, "fsdp": 3, "context": 1}, "not divisible by 3"),
    ({"data": -1, "context": 1}, "needs a 'fsdp' axis"),
    ({"data": -1, "fsdp": 1, "context": 1, "model": 2}, "must be among"),
])
def test_mesh_size_errors(axes, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_sizes(axes, 8)


class _Annotated(nnx.Module):
    def __init__(self, rngs):
        annotate = lambda names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        self.up = nnx.Linear(64, 256, kernel_init=annotate(("embed", "mlp")), rngs=rngs)
        self.odd = nnx.Linear(6, 256, kernel_init=annotate(("embed", "mlp")), rngs=rngs)
        self.plain = nnx.Linear(256, 512, rngs=rngs)
        self.small = nnx.Linear(8, 8, rngs=rngs)


def test_parameter_shardings_follow_annotations_then_fsdp():
    mesh = AbstractMesh((2, 4, 1), ("data", "fsdp", "context"))
    rules = sharding.logical_rules(base.get_config())
    with nnx.use_eager_sharding(False):
        params = nnx.state(nnx.eval_shape(lambda: _Annotated(nnx.Rngs(0))), nnx.Param)
    specs = jax.tree.map(lambda v: v.get_value().spec, sharding.state_shardings(params, mesh, rules),
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert specs["up"]["kernel"] == P("fsdp", None)  # embed -> fsdp, mlp -> replicated
    assert specs["odd"]["kernel"] == P(None, None)  # 6 rows cannot split 4 ways
    assert specs["plain"]["kernel"] == P(None, "fsdp")  # unannotated: largest dimension divisible by 4
    assert specs["plain"]["bias"] == P(None) and specs["small"]["kernel"] == P(None, None)  # too small
    unsharded = sharding.state_shardings(params, AbstractMesh((8, 1, 1), ("data", "fsdp", "context")), rules)
    assert all(s.spec == P(*[None] * len(s.spec)) for s in jax.tree.leaves(unsharded))


def test_batch_shardings():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "context"))
    assert sharding.batch_sharding(mesh, 4).spec == P(("data", "fsdp"), None, None, None)
    assert sharding.batch_sharding(mesh, 2, sequence=True).spec == P(("data", "fsdp"), "context")


def test_schedule_and_weight_decay_mask():
    config = base.get_config()
    config.optimizer.update(learning_rate=1.0, min_learning_rate=0.1, warmup_steps=10)
    schedule = optimizer.learning_rate_schedule(config, 110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(110)], [0, 0.5, 1.0, 0.1],
                               atol=1e-6)
    config.optimizer.schedule = "constant"
    np.testing.assert_allclose(optimizer.learning_rate_schedule(config, 110)(50), 1.0)
    mask = optimizer.decay_mask({"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "conv": jnp.ones((3, 3, 1, 4))})
    assert mask == {"kernel": True, "bias": False, "conv": True}


def test_ema_update_warms_up_then_uses_the_decay():
    ema, params = {"w": jnp.zeros(())}, {"w": jnp.ones(())}
    np.testing.assert_allclose(optimizer.ema_update(ema, params, 0.999, 0)["w"], 0.9)  # d = 1 / 10
    np.testing.assert_allclose(optimizer.ema_update(ema, params, 0.999, 10 ** 6)["w"], 0.001, rtol=1e-4)


class _TwoDropouts(nnx.Module):
    def __init__(self, rngs):
        self.a, self.b = nnx.Dropout(0.5, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.a(x), self.b(x)


def test_reseeding_is_per_step_and_per_stream():
    model = _TwoDropouts(nnx.Rngs(dropout=0))
    graph, rng_state = nnx.split(model, nnx.RngState)

    def masks(step):
        rngs = state_lib.reseeded(rng_state, jax.random.fold_in(jax.random.key(0), step))
        return nnx.merge(graph, rngs, copy=True)(jnp.ones(64))

    a0, b0 = masks(0)
    a0_again, _ = masks(0)
    a1, _ = masks(1)
    np.testing.assert_array_equal(a0, a0_again)
    assert not np.array_equal(a0, b0) and not np.array_equal(a0, a1)


def test_metric_writer_trims_lines_after_the_resumed_step(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), total_steps=10, start_step=0, enabled=True)
    for step in (2, 4, 6):
        writer.write(step, {"train/loss": 1.0 / step, "train/lr": 0.1})
    writer.write(6, {"eval/accuracy": float("nan")})
    writer.close()
    resumed = metrics.MetricWriter(str(tmp_path), total_steps=10, start_step=4, enabled=True)
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert (tmp_path / metrics.CURVES_FILE).stat().st_size > 1000


def _lm_config(**model_kwargs):
    config = base.get_config()
    config.task, config.model = "lm", "softmax_lm_tiny"
    config.model_kwargs = ml_collections.ConfigDict({**dict(d_model=32, num_layers=2, num_heads=4, glu_dim=48),
                                                     **model_kwargs})
    return config


def test_remat_and_dtypes_reach_the_model_or_fail_naming_the_key():
    config = _lm_config()
    config.remat, config.dtype = "dots_saveable", "bfloat16"
    model = nnx.eval_shape(lambda: state_lib.build_model(config, 260, nnx.Rngs(0)))
    assert model.segments[0].remat == "dots_saveable" and model.head.dtype == jnp.bfloat16
    assert model.head.kernel.dtype == jnp.float32  # param_dtype stays float32
    config.model_kwargs.remat = "full"
    with pytest.raises(state_lib.ConfigError, match="config.remat = 'dots_saveable' contradicts"):
        state_lib.build_model(config, 260, nnx.Rngs(0))
    user = base.get_config()  # a user's model that has no remat option: never silently ignored
    user.model, user.remat = "tiny_train_models:classifier", "full"
    with nnx.use_eager_sharding(False):  # as the training loop builds it
        with pytest.raises(state_lib.ConfigError, match=r"config.remat = 'full': model .* does not take `remat=`"):
            state_lib.build_model(user, 10, nnx.Rngs(0))
        user.remat = "none"  # defaults are not passed: models without the options build as before
        state_lib.build_model(user, 10, nnx.Rngs(0))


def test_tensor_axis_must_split_heads_and_mlp_evenly():
    params = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(_lm_config(num_heads=2), 260, nnx.Rngs(0))),
                       nnx.Param)
    sharding.check_tensor_split(params, AbstractMesh((1, 2), ("data", "tensor")))
    with pytest.raises(ValueError, match=r"mesh.tensor` = 4 must divide every 'heads' dimension; parameter "
                                         r"segments/0/blocks/mixer/\w+/kernel .* has 2 along dim"):
        sharding.check_tensor_split(params, AbstractMesh((1, 4), ("data", "tensor")))


def test_lm_parameters_split_megatron_style_over_tensor_and_fsdp():
    config = _lm_config(num_kv_heads=1)
    mesh = AbstractMesh((1, 2, 1, 2), ("data", "fsdp", "context", "tensor"))
    params = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(config, 260, nnx.Rngs(0))), nnx.Param)
    specs = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_value().spec, sharding.state_shardings(params, mesh),
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))
    layer = specs["segments"][0]["blocks"]
    assert layer["mixer"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor", None)  # [layers, embed, heads, dim]
    assert layer["mixer"]["k_proj"]["kernel"] == P(None, "fsdp", None, None)  # one kv head: replicated
    assert layer["mixer"]["o_proj"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert layer["mlp"]["l1"]["kernel"] == P(None, "fsdp", "tensor") and layer["mlp"]["l3"]["kernel"] == P(
        None, "tensor", "fsdp")
    assert specs["embed"]["embedding"] == P("tensor", "fsdp") and specs["head"]["kernel"] == P("fsdp", "tensor")
