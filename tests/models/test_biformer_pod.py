"""BiFormer on pods: every parameter named, scanned == unrolled (values and gradients, via the converters), the
same gradients under remat, bf16 compute with fp32 where it must be, bad options."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import models
from jaxattn.models.biformer import convert
from jaxattn.testing import pod_checks
from jaxattn.testing.model_init import abstract_model

# Two stages of 2 blocks (so the scans repeat): BRA on an 8x8 map (2x2 regions, 2 heads), global attention on 4x4.
SMALL = dict(depths=(2, 2), embed_dims=(16, 32), qk_dims=(16, 32), head_dim=8, mlp_ratios=(2, 2), topks=(2, -2),
             num_classes=5, img_size=32)
BATCH = (jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32), jnp.array([1, 3]))


def build(fill="zeros", train=False, **options):
    """The small model, built abstractly and filled (jax arrays: train-mode BatchNorms update their statistics
    inside the traced loss). Gradients are compared in eval mode: BatchNorm over a few values per channel, as a
    small model's late stages have, amplifies rounding differences (a recomputed forward's) a thousandfold."""
    model = abstract_model(lambda: models.create_model("biformer_pico", **SMALL, **options), fill=fill)
    nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))
    if not train:
        model.eval()
    return model


LOADED = (nnx.Param, nnx.BatchStat)


def params(model):
    """Parameters and BatchNorm statistics (eval mode uses them) as a pure state."""
    return nnx.to_pure_dict(nnx.state(model, LOADED))


def load(model, unrolled):
    """`model` with the parameters and statistics of the unrolled pure state `unrolled`."""
    return pod_checks.load_pure(model, convert.from_unrolled(unrolled, model), LOADED)


@functools.cache
def reference():
    """The fp32, scanned, remat-free model every test compares with."""
    return build(fill="random")


def reference_unrolled_params():
    return convert.to_unrolled(params(reference()), reference())


def image_loss(model, batch):
    """`pod_checks.image_loss` on a copy of `model` whose variables belong to the trace, so that the train-mode
    BatchNorms can update their statistics (on the copy)."""
    graphdef, state = nnx.split(model)
    return pod_checks.image_loss(nnx.merge(graphdef, jax.tree.map(lambda a: a, state)), batch)


@functools.cache
def loss_and_grads(model):
    return pod_checks.loss_and_grads(model, image_loss, BATCH)


def forward(model):
    graphdef, state = nnx.split(model)
    run = lambda state, images: nnx.merge(graphdef, state)(images)
    compiled = jax.jit(run).lower(state, BATCH[0]).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(state, BATCH[0])


def unrolled_grads(model, grads):
    return convert.to_unrolled(nnx.to_pure_dict(grads), model)


@pytest.mark.parametrize("name,scan", [(name, True) for name in models.list_models(family="biformer")]
                         + [("biformer_pico", False)])
def test_every_parameter_is_named(name, scan):
    model = nnx.eval_shape(lambda: models.create_model(name, scan_blocks=scan, drop_path_rate=0.1,
                                                       layer_scale=1e-6, rngs=nnx.Rngs(0)))
    pod_checks.assert_every_parameter_named(model, stacked=lambda path: scan and "blocks" in path)


def test_scanned_equals_unrolled_values_and_gradients():
    scanned = reference()
    unrolled = load(build(scan_blocks=False), reference_unrolled_params())
    assert not unrolled.stages[1].scan and len(unrolled.stages[1].blocks) == 2
    (loss, logits), grads = loss_and_grads(scanned)
    (u_loss, u_logits), u_grads = loss_and_grads(unrolled)
    np.testing.assert_allclose(u_logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(u_loss, loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5),
                 nnx.to_pure_dict(u_grads), unrolled_grads(scanned, grads))
    back = convert.from_unrolled(reference_unrolled_params(), scanned)
    jax.tree.map(np.testing.assert_array_equal, back, params(scanned))
    with pytest.raises(ValueError, match="needs blocks 0..1"):
        broken = reference_unrolled_params()
        del broken["stages"][0]["blocks"][1]
        convert.from_unrolled(broken, scanned)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_gradients(policy):
    (loss, _), grads = loss_and_grads(reference())
    model = load(build(remat=policy), reference_unrolled_params())
    assert all(stage.remat == policy for stage in model.stages)
    (got_loss, _), got = loss_and_grads(model)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5), nnx.to_pure_dict(got),
                 nnx.to_pure_dict(grads))


def test_bf16_compute_keeps_fp32_where_it_must():
    bf16 = load(build(dtype="bfloat16", train=True), reference_unrolled_params())
    pod_checks.assert_bf16_keeps_fp32(bf16, image_loss, BATCH)  # train mode: BatchNorm's batch statistics
    bf16.eval()
    logits = forward(bf16)  # the values: the forward suffices (the jaxpr above covers the gradient)
    (_, fp32_logits), _ = loss_and_grads(reference())
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, fp32_logits, atol=0.05 * float(jnp.abs(fp32_logits).max()))


def test_bad_options():
    with pytest.raises(ValueError, match="`remat` must be one of"):
        build(remat="sometimes")
    with pytest.raises(ValueError, match="`dtype` must be a floating-point dtype"):
        build(dtype="int8")
    with pytest.raises(ValueError, match="`param_dtype` must be a floating-point dtype"):
        build(param_dtype="int32")
