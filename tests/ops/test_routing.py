"""Bi-level routing attention: region selection, the scan-over-regions XLA path vs the gather-based reference
(forward and gradients, fp32/bf16, topk 1 / several steps / all regions = global attention), detached routing,
memory (no k-fold copies), bad inputs, and a hypothesis sweep against a dense masked formulation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxattn
from jaxattn.routing import common, reference, xla
from jaxattn.testing import assert_allclose, assert_matches_reference


def _randn(seed, *shapes):
    """Inputs from numpy: no per-shape compile of a random kernel."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes)


def _qkv(seed, b, h, w, n, d, dv):
    return _randn(seed, (b, h, w, n, d), (b, h, w, n, d), (b, h, w, n, dv))


def test_select_regions_matches_brute_force():
    q, k, _ = _qkv(0, 2, 6, 9, 2, 4, 4)
    got = np.sort(np.asarray(common.select_regions(q, k, (3, 3), 4, 0.5)), axis=-1)

    def region_means(x):  # rows (j h), columns (i w) -> region j*3 + i
        x = np.asarray(x).reshape(2, 3, 2, 3, 3, 8).transpose(0, 1, 3, 2, 4, 5).reshape(2, 9, 6, 8)
        return x.mean(axis=2)

    affinity = np.einsum("brc,bsc->brs", region_means(q), region_means(k))
    want = np.sort(np.argsort(-affinity, axis=-1)[..., :4], axis=-1)
    np.testing.assert_array_equal(got, want)


def test_slots_per_step_bounds_the_gathered_keys():
    assert xla.slots_per_step(topk=1, region_tokens=64) == 1
    assert xla.slots_per_step(topk=16, region_tokens=64) == 1  # 56x56 maps: one region per step
    assert xla.slots_per_step(topk=4, region_tokens=16) == 4  # 28x28, stage 2
    assert xla.slots_per_step(topk=16, region_tokens=4) == 16  # 14x14, stage 3
    assert xla.slots_per_step(topk=6, region_tokens=16) == 3


def _op(num_regions, topk, implementation=None):
    return jax.jit(lambda q, k, v: jaxattn.bilevel_routing_attention(q, k, v, num_regions, topk,
                                                                     implementation=implementation))


def test_detached_routing_gradients_equal_those_of_fixed_regions():
    """The selection is a constant for autodiff: gradients match attention to precomputed regions."""
    q, k, v = _qkv(1, 2, 6, 9, 2, 4, 5)
    scale = 8 ** -0.5
    indices = common.select_regions(q, k, (3, 3), 1, scale)
    fixed = jax.jit(functools.partial(reference.routed_attention_reference, indices=indices, num_regions=(3, 3),
                                      scale=scale))
    assert_matches_reference(_op(3, 1), fixed, (q, k, v), names=["query", "key", "value"])


@pytest.mark.parametrize("case, dtype", [("topk1", jnp.bfloat16), ("two_steps", jnp.float32),
                                         ("two_steps_of_three", jnp.float32)])
def test_matches_gather_reference(case, dtype):
    b, h, w, regions, topk = {"topk1": (2, 6, 9, 3, 1),
                              "two_steps": (1, 16, 16, 2, 2),  # 64-token regions: one region per step
                              "two_steps_of_three": (1, 8, 12, (2, 3), 5)}[case]
    assert_matches_reference(_op(regions, topk), _op(regions, topk, "reference"), _qkv(2, b, h, w, 2, 4, 3),
                             dtype=dtype, names=["query", "key", "value"])


def test_all_regions_is_global_attention():
    q, k, v = _qkv(3, 2, 8, 12, 2, 4, 3)

    @jax.jit
    def global_attention(q, k, v):
        flat = lambda x: x.reshape(2, 96, 2, -1)  # noqa: E731
        out = jaxattn.dot_product_attention(flat(q), flat(k), flat(v), scale=8 ** -0.5, implementation="reference")
        return out.reshape(2, 8, 12, 2, 3)

    assert_matches_reference(_op((2, 3), 6), global_attention, (q, k, v), names=["query", "key", "value"])
    assert_allclose(_op((2, 3), 6, "reference")(q, k, v), global_attention(q, k, v))


def test_reference_gradients_numerically():
    q, k, v = _qkv(4, 1, 4, 4, 1, 2, 2)
    indices = jnp.array([[[0, 3], [1, 0], [2, 1], [3, 2]]], jnp.int32)
    f = functools.partial(reference.routed_attention_reference, indices=indices, num_regions=(2, 2), scale=0.7)
    check_grads(jax.jit(f), (q, k, v), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_xla_path_keeps_no_topk_fold_copies():
    """Compiled fwd+bwd temporaries: the scan path stays well under the gather form (topk = 16 here)."""
    spec = jax.ShapeDtypeStruct((1, 28, 28, 2, 16), jnp.float32)

    def temp_bytes(implementation):
        loss = lambda q, k, v: jnp.sum(jaxattn.bilevel_routing_attention(  # noqa: E731
            q, k, v, 7, 16, implementation=implementation))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla") < 0.5 * temp_bytes("reference")


def test_bad_inputs_raise_value_errors_naming_the_argument():
    q, k, v = _qkv(5, 1, 6, 6, 2, 4, 4)
    with pytest.raises(ValueError, match="multiples of `num_regions`"):
        jaxattn.bilevel_routing_attention(q, k, v, 4, 1)
    with pytest.raises(ValueError, match="`num_regions`"):
        jaxattn.bilevel_routing_attention(q, k, v, 0, 1)
    with pytest.raises(ValueError, match=r"`topk` must be an int in \[1, 9\]"):
        jaxattn.bilevel_routing_attention(q, k, v, 3, 10)
    with pytest.raises(ValueError, match="`topk`"):
        jaxattn.bilevel_routing_attention(q, k, v, 3, 0)
    with pytest.raises(ValueError, match="`key` spatial size"):
        jaxattn.bilevel_routing_attention(q, k[:, :3], v[:, :3], 3, 1)
    with pytest.raises(ValueError, match="`value` num_heads"):
        jaxattn.bilevel_routing_attention(q, k, v[..., :1, :], 3, 1)


def _dense_masked(q, k, v, indices, num_regions, scale):
    """Second opinion: global attention with a token mask "key's region is routed to the query's region"."""
    b, h, w, n, _ = q.shape
    region = common.from_regions(
        jnp.broadcast_to(jnp.arange(num_regions[0] * num_regions[1])[None, :, None],
                         (1, num_regions[0] * num_regions[1], (h // num_regions[0]) * (w // num_regions[1]))),
        num_regions, (h, w)).reshape(-1)  # region id of each token
    routed = jnp.any(indices[:, region][:, :, :, None] == region[None, None, None, :], axis=2)  # [B, HW, HW]
    flat = lambda x: x.reshape(b, h * w, n, -1)  # noqa: E731
    out = jaxattn.dot_product_attention(flat(q), flat(k), flat(v), mask=routed[:, None], scale=scale,
                                        implementation="reference")
    return out.reshape(b, h, w, n, -1)


@settings(max_examples=6)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 9),
       st.integers(1, 2))
def test_property_against_dense_masked_attention(sh, sw, rh, rw, topk, n):
    topk = min(topk, sh * sw)
    q, k, v = _qkv(6, 1, sh * rh, sw * rw, n, 4, 3)

    @jax.jit
    def all_forms(q, k, v):
        scale = (n * 4) ** -0.5
        indices = common.select_regions(q, k, (sh, sw), topk, scale)
        return (jaxattn.bilevel_routing_attention(q, k, v, (sh, sw), topk),
                jaxattn.bilevel_routing_attention(q, k, v, (sh, sw), topk, implementation="reference"),
                _dense_masked(q, k, v, indices, (sh, sw), scale))

    got, gathered, dense = all_forms(q, k, v)
    assert_allclose(got, dense)
    assert_allclose(gathered, dense)
