"""DiNAT on pods: every parameter named, scanned == unrolled (values and gradients, via the per-block names), the
same gradients under remat, bf16 compute with fp32 where it must be, and bad options rejected."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import models
from jaxattn.models.dinat import stacking
from jaxattn.models.layers import axes
from jaxattn.models.layers.drop_path import DropRate
from jaxattn.testing import pod_checks
from jaxattn.testing.model_init import abstract_model

# Stage 0 is a scanned pair (dilations 1, 2) and a remainder block; stage 1 a stack of two single blocks. Layer
# scale on, so the gains are covered. No drop path: the stacks then hold parameters only (`pod_checks.loss_and_grads`
# merges the model's other state from outside its trace, which a scan that carries rates and rng counts would
# write back).
SMALL = dict(embed_dim=8, depths=(3, 2), num_heads=(2, 2), kernel_size=3, mlp_ratio=2.0, dilations=[[1, 2, 1], [1, 1]],
             img_size=24, num_classes=5, layer_scale=0.5, drop_path_rate=0.0)
BATCH = (jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 24, 3)), jnp.float32), jnp.array([1, 4]))


def build(fill="zeros", **options):
    model = abstract_model(lambda: models.create_model("dinat_mini", rngs=nnx.Rngs(0), **SMALL, **options),
                           fill=fill)
    return model


def per_block_params(model):
    return stacking.to_per_block(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model)


def load(model, per_block):
    return pod_checks.load_pure(model, stacking.from_per_block(per_block, model))


@functools.cache
def reference():
    """The fp32, scanned, remat-free model every test compares with."""
    return build(fill="random")


@functools.cache
def loss_and_grads(model):
    return pod_checks.loss_and_grads(model, pod_checks.image_loss, BATCH)


def test_every_parameter_is_named():
    for name in models.list_models(family="dinat"):
        model = nnx.eval_shape(lambda name=name: models.create_model(name, rngs=nnx.Rngs(0)))
        pod_checks.assert_every_parameter_named(model, stacked=lambda path: "segments" in path)
    unrolled = nnx.eval_shape(lambda: models.create_model("dinat_mini", scan_blocks=False, **SMALL))
    pod_checks.assert_every_parameter_named(unrolled)
    attn = reference().levels[0].segments[0].blocks.blocks[0].attn
    assert axes.logical_names(attn.qkv.kernel) == (axes.LAYERS, axes.EMBED, None, axes.HEADS, axes.HEAD_DIM)
    assert axes.logical_names(attn.proj.kernel) == (axes.LAYERS, axes.HEADS, axes.HEAD_DIM, axes.EMBED)


def test_stages_split_into_units_of_their_dilation_period():
    assert stacking.segment_plan([1, 8, 1]) == (((1, 8), 1), ((1,), 1))
    assert stacking.segment_plan([1, 2] * 9) == (((1, 2), 9),)
    assert stacking.segment_plan([1] * 5) == (((1,), 5),)
    assert not nnx.state(reference(), DropRate)  # zero rates stay static: nothing per unit to carry
    assert stacking.segment_plan([1, 2, 3, 1]) == (((1, 2, 3), 1), ((1,), 1))
    large = nnx.eval_shape(lambda: models.create_model("dinat_large", img_size=384, rngs=nnx.Rngs(0)))
    assert [level.plan for level in large.levels] == [(((1, 13), 1), ((1,), 1)), (((1, 6), 2),), (((1, 3), 9),),
                                                      (((1,), 5),)]
    assert large.levels[2].segments[0].blocks.blocks[1].attn.qkv.kernel.shape == (9, 768, 3, 24, 32)


def test_scanned_drop_path_rates_are_the_per_block_rates():
    """Computed by the constructor (the numpy fill zeroes them): one small compile, parameters eliminated."""
    rates = jax.jit(lambda: nnx.to_pure_dict(nnx.state(
        models.create_model("dinat_mini", rngs=nnx.Rngs(0), **{**SMALL, "drop_path_rate": 0.1}), DropRate)))()
    segments = rates["levels"][0]["segments"]
    np.testing.assert_allclose(segments[0]["blocks"]["blocks"][1]["drop_path"]["rate"], [0.025])
    np.testing.assert_allclose(segments[1]["blocks"]["blocks"][0]["drop_path"]["rate"], [0.05])
    np.testing.assert_allclose(rates["levels"][1]["segments"][0]["blocks"]["blocks"][0]["drop_path"]["rate"],
                               [0.075, 0.1])


def test_scanned_equals_unrolled_values_and_gradients():
    scanned = reference()
    unrolled = load(build(scan_blocks=False), per_block_params(scanned))
    assert not unrolled.scan_blocks and len(unrolled.levels[1].segments[0].blocks) == 2
    (loss, logits), grads = loss_and_grads(scanned)
    (u_loss, u_logits), u_grads = loss_and_grads(unrolled)
    np.testing.assert_allclose(u_logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(u_loss, loss, rtol=1e-6)
    want = stacking.to_per_block(nnx.to_pure_dict(grads), scanned)
    got = stacking.to_per_block(nnx.to_pure_dict(u_grads), unrolled)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5), got, want)
    # The per-block names round-trip exactly, and name the reference's blocks.
    per_block = per_block_params(scanned)
    assert sorted(per_block["levels"][0]["blocks"]) == [0, 1, 2]
    assert per_block["levels"][0]["blocks"][1]["attn"]["qkv"]["kernel"].shape == (8, 3, 2, 4)
    jax.tree.map(np.testing.assert_array_equal, stacking.from_per_block(per_block, scanned),
                 nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
    del per_block["levels"][1]["blocks"][1]
    with pytest.raises(ValueError, match="needs blocks 0..1"):
        stacking.from_per_block(per_block, scanned)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_gradients(policy):
    (loss, _), grads = loss_and_grads(reference())
    model = load(build(remat=policy), per_block_params(reference()))
    assert all(segment.remat == policy for level in model.levels for segment in level.segments)
    (got_loss, _), got = loss_and_grads(model)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-5), nnx.to_pure_dict(got),
                 nnx.to_pure_dict(grads))


def test_bf16_compute_keeps_fp32_where_it_must():
    fp32 = reference()
    bf16 = load(build(dtype="bfloat16"), per_block_params(fp32))
    pod_checks.assert_bf16_keeps_fp32(bf16, pod_checks.image_loss, BATCH)
    (bf16_loss, logits), grads = loss_and_grads(bf16)
    assert logits.dtype == jnp.float32 and {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    (fp32_loss, fp32_logits), _ = loss_and_grads(fp32)
    np.testing.assert_allclose(bf16_loss, fp32_loss, rtol=2e-2)
    np.testing.assert_allclose(logits, fp32_logits, atol=0.05 * float(jnp.abs(fp32_logits).max()) + 0.02)


def test_bad_options():
    with pytest.raises(ValueError, match="`remat` must be one of"):
        build(remat="sometimes")
    with pytest.raises(ValueError, match="`dtype` must be a floating-point dtype"):
        build(dtype="int8")
    with pytest.raises(ValueError, match="`param_dtype` must be a floating-point dtype"):
        build(param_dtype="int32")
