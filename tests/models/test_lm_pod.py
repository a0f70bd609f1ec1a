"""Language models on pods: every parameter named, scanned == unrolled (values and gradients), per-layer names both
ways, identical gradients under every remat policy, bf16 compute with fp32 where it must be."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn import models
from jaxattn.models.layers import axes, remat
from jaxattn.models.lm.stacking import from_per_layer, to_per_layer
from jaxattn.testing import pod_checks
from jaxattn.testing.model_init import abstract_model

# 3 layers: TransNormer's LRPE layer 0 is one segment, layers 1-2 a scanned segment of two.
SMALL = dict(d_model=32, num_layers=3, num_heads=4, vocab_size=64)
FAMILIES = {
    "transnormer": ("transnormer_tiny", dict(block_size=4)),
    "softmax_gqa": ("softmax_lm_tiny", dict(num_kv_heads=2)),
}


def build(family, fill="zeros", **options):
    """The small model, built abstractly and filled with numpy (no per-shape init compiles); zeros for models that
    get their parameters from `load`."""
    name, extra = FAMILIES[family]
    return abstract_model(lambda: models.create_model(name, rngs=nnx.Rngs(0), **SMALL, **extra, **options),
                          fill=fill)


TOKENS = jax.random.randint(jax.random.key(1), (2, 11), 0, SMALL["vocab_size"])


def load(model, per_layer):
    """`model` with the parameters of the per-layer pure state `per_layer`."""
    return pod_checks.load_pure(model, from_per_layer(per_layer, model))


def per_layer_params(model):
    return to_per_layer(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model)


@functools.cache
def reference(family):
    """The fp32, scanned, remat-free model every test compares with (built and compiled once)."""
    return build(family, fill="random")


def next_token_loss(model, tok):
    logits = model(tok[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean(), logits


@functools.cache
def loss_and_grads(model):
    """`(loss, logits), grads` of the next-token loss on `TOKENS`, compiled once per model."""
    return pod_checks.loss_and_grads(model, next_token_loss, TOKENS)


@pytest.mark.parametrize("name", models.list_models(kind="lm"))
def test_every_parameter_is_named(name):
    model = nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0)))
    pod_checks.assert_every_parameter_named(model, stacked=lambda path: "segments" in path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_equals_unrolled_values_and_gradients(family):
    scanned = reference(family)
    unrolled = load(build(family, scan_layers=False), per_layer_params(scanned))
    (loss, logits), grads = loss_and_grads(scanned)
    (u_loss, u_logits), u_grads = loss_and_grads(unrolled)
    np.testing.assert_allclose(u_logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(u_loss, loss, rtol=1e-6)
    want = to_per_layer(nnx.to_pure_dict(grads), scanned)
    got = to_per_layer(nnx.to_pure_dict(u_grads), unrolled)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5), got, want)


def test_per_layer_names_round_trip_exactly():
    scanned = reference("transnormer")
    per_layer = per_layer_params(scanned)
    assert sorted(per_layer["layers"]) == [0, 1, 2] and "theta" in per_layer["layers"][0]["mixer"]
    assert per_layer["layers"][1]["mixer"]["qkvu"]["kernel"].shape == (32, 4, 4, 8)  # one layer's kernel
    back = from_per_layer(per_layer, scanned)
    jax.tree.map(np.testing.assert_array_equal, back, nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
    unrolled = load(build("transnormer", scan_layers=False), per_layer)
    jax.tree.map(np.testing.assert_array_equal, per_layer_params(unrolled), per_layer)
    del per_layer["layers"][2]
    with pytest.raises(ValueError, match="must hold layers 0..2"):
        from_per_layer(per_layer, scanned)


# Every policy on the family with two segments and per-layer constants; the other family once (the policies
# themselves are the shared Stack's, tested in tests/models/test_pod_layers.py).
@pytest.mark.parametrize("family,policy", [("transnormer", p) for p in remat.POLICIES if p != "none"]
                         + [("softmax_gqa", "dots_with_no_batch_dims_saveable")])
def test_every_remat_policy_gives_the_same_gradients(family, policy):
    (loss, _), grads = loss_and_grads(reference(family))
    model = load(build(family, remat=policy), per_layer_params(reference(family)))
    assert all(segment.remat == policy for segment in model.segments)
    (got_loss, _), got = loss_and_grads(model)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-5), nnx.to_pure_dict(got),
                 nnx.to_pure_dict(grads))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_compute_keeps_fp32_where_it_must(family):
    fp32 = reference(family)
    bf16 = load(build(family, dtype="bfloat16"), per_layer_params(fp32))
    pod_checks.assert_bf16_keeps_fp32(bf16, next_token_loss, TOKENS)
    (bf16_loss, logits), grads = loss_and_grads(bf16)
    assert logits.dtype == jnp.float32 and {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    (fp32_loss, fp32_logits), _ = loss_and_grads(fp32)
    np.testing.assert_allclose(bf16_loss, fp32_loss, rtol=2e-3)
    np.testing.assert_allclose(logits, fp32_logits, atol=0.05 * float(jnp.abs(fp32_logits).max()))


def test_bad_options():
    with pytest.raises(ValueError, match="`remat` must be one of"):
        build("transnormer", remat="sometimes")
    with pytest.raises(ValueError, match="`dtype` must be a floating-point dtype"):
        build("softmax_gqa", dtype="int8")
