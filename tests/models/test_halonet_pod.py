"""HaloNet on pods: every parameter named, scanned == unrolled (values and gradients, via the per-block converter),
repeating units found from the block configs (pairs of interleaved blocks, a tail), drop-path rates per block,
remat policies, bf16 compute with fp32 where it must be, bad options."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import models
from jaxattn.models.halonet import AttnCfg, interleave, stage
from jaxattn.models.halonet.stage import Stage, find_period, from_per_block, to_per_block
from jaxattn.models.layers import DropPath
from jaxattn.testing import pod_checks
from jaxattn.testing.model_init import abstract_model

# One stage: a bottleneck (with shortcut conv), then [attn, bottle] x 2 scanned, then an attention block.
SMALL = dict(stages=[interleave(("bottle", "self_attn"), 6, 8, 1, 0.5)], stem_chs=8,
             attn=AttnCfg(block_size=2, halo_size=1, num_heads=2), img_size=8, num_classes=5, drop_path_rate=0.0)
BATCH = (jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), jnp.array([1, 3]))


def build(fill="zeros", **options):
    """The small model; its arrays are jax arrays (BatchNorm writes its statistics in place, also when a traced
    step closes over them)."""
    model = abstract_model(lambda: models.create_model("halonet_pico", rngs=nnx.Rngs(0), **SMALL, **options),
                           fill=fill)
    nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))
    return model


def per_block_params(model):
    return to_per_block(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model)


def load(model, per_block):
    return pod_checks.load_pure(model, from_per_block(per_block, model))


@functools.cache
def reference():
    """fp32, scanned, no remat, random weights (BN scales 1: every branch gets gradients)."""
    return build(fill="random")


@functools.cache
def loss_and_grads(model):
    return pod_checks.loss_and_grads(model, pod_checks.image_loss, BATCH)


def grads_per_block(model, grads):
    return to_per_block(nnx.to_pure_dict(grads), model)


@pytest.mark.parametrize("name", ["halonet_h7", "halonet50ts", "sehalonet33ts"])
def test_every_parameter_is_named(name):
    model = nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0)))
    pod_checks.assert_every_parameter_named(model, stacked=lambda path: "repeat" in path)
    stages = model.stages
    assert [(s.period, s.repeats, len(s.tail)) for s in stages] == (
        [(1, 2, 0), (1, 2, 0), (1, 25, 0), (1, 2, 0)] if name == "halonet_h7" else
        [(1, 2, 0), (3, 1, 0), (2, 2, 1), (2, 1, 0)] if name == "halonet50ts" else
        [(1, 1, 0), (2, 1, 0), (2, 1, 0), (1, 1, 0)])
    block = next(b for b in stages[2].repeat.blocks.blocks if hasattr(b, "self_attn"))
    names = {p: v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(block, nnx.Param))}
    assert names[("self_attn", "q", "kernel")][-1] == "conv_out"  # column-parallel: heads over `tensor`
    assert names[("conv3_1x1", "conv", "kernel")][-2:] == ("mlp", "embed")  # row-parallel


def test_find_period_and_per_block_layout_round_trip():
    pair = ("bottle", "self_attn")
    assert [find_period(interleave(pair, d, 8)[1:]) for d in (2, 3, 6)] == [1, 2, 2]
    assert find_period(stage("self_attn", 4, 8)[1:]) == 1
    model = reference()
    per_block = per_block_params(model)
    assert sorted(per_block["stages"][0]) == list(range(6))
    assert "conv2_kxk" in per_block["stages"][0][2] and "self_attn" in per_block["stages"][0][5]
    back = from_per_block(per_block, model)
    jax.tree.map(np.testing.assert_array_equal, back, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    del per_block["stages"][0][5]
    with pytest.raises(ValueError, match="blocks 0..5"):
        from_per_block(per_block, model)


class _Recorder(nnx.Module):
    def __init__(self, rate):
        self.drop_path = DropPath(rate)

    def __call__(self, x):
        return x


@pytest.mark.parametrize("scan", [True, False])
def test_drop_path_rates_reach_each_block(scan):
    cfgs = interleave(("bottle", "self_attn"), 6, 8, 2)
    rates = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    st = Stage(lambda cfg, chs, rate, rngs: _Recorder(rate), cfgs, 4, rates, scan=scan, remat="none",
               rngs=nnx.Rngs(0))
    got = {0: st.first.drop_path.rate, 5: st.tail[0].drop_path.rate}
    for u in range(2):
        for k in range(2):
            rate = st.repeat.blocks.blocks[k].drop_path.rate[...][u] if scan else \
                st.repeat.blocks[u].blocks[k].drop_path.rate
            got[st.block_index(u, k)] = float(rate)
    np.testing.assert_allclose([got[j] for j in range(6)], rates, rtol=1e-6)


def test_scanned_equals_unrolled_values_and_gradients():
    scanned = reference()
    unrolled = load(build(scan_blocks=False), per_block_params(scanned))
    assert not unrolled.stages[0].scanned and scanned.stages[0].scanned
    (loss, logits), grads = loss_and_grads(scanned)
    (u_loss, u_logits), u_grads = loss_and_grads(unrolled)
    np.testing.assert_allclose(u_logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(u_loss, loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4),
                 grads_per_block(unrolled, u_grads), grads_per_block(scanned, grads))


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_gradients(policy):
    (loss, _), grads = loss_and_grads(reference())
    model = load(build(remat=policy), per_block_params(reference()))
    assert all(s.remat == policy and s.repeat.remat == policy for s in model.stages)
    (got_loss, _), got = loss_and_grads(model)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5), nnx.to_pure_dict(got),
                 nnx.to_pure_dict(grads))


def test_bf16_compute_keeps_fp32_where_it_must():
    bf16 = load(build(dtype="bfloat16"), per_block_params(reference()))
    pod_checks.assert_bf16_keeps_fp32(bf16, pod_checks.image_loss, BATCH)
    bf16.eval()  # running-statistics BatchNorm too
    pod_checks.assert_bf16_keeps_fp32(bf16, pod_checks.image_loss, BATCH)
    logits = nnx.eval_shape(lambda m: m(BATCH[0]), bf16)
    assert logits.dtype == jnp.float32


def test_bad_options():
    with pytest.raises(ValueError, match="`remat` must be one of"):
        nnx.eval_shape(lambda: models.create_model("halonet_pico", remat="sometimes", rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="`dtype` must be a floating-point dtype"):
        nnx.eval_shape(lambda: models.create_model("halonet_pico", dtype="int8", rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="`param_dtype` must be a floating-point dtype"):
        nnx.eval_shape(lambda: models.create_model("halonet_pico", param_dtype=None, rngs=nnx.Rngs(0)))
