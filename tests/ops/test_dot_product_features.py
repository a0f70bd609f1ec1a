"""dot_product_attention's issue-16 features (sinks, soft-cap, per-head windows, kv_lengths, block-sparse masks,
FlashBias factors): the xla path against the reference, forward and gradients, fp32 and bf16, GQA, odd lengths."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxattn
from jaxattn.dot_product import api
from jaxattn.testing import assert_allclose, assert_matches_reference, random_inputs
from jaxattn.testing.lowering import jaxpr_equations


def _shapes(b, t, s, n, k, h):
    return [(b, t, n, h), (b, s, k, h), (b, s, k, h)]


def _block_mask(seed, shape, density=0.5):
    mask = np.random.default_rng(seed).random(shape) < density
    mask[..., 0, 0] = True  # at least one visited block
    return jnp.asarray(mask)


def _op(impl, static, diff):
    """`f(q, k, v, *arrays)` with `diff` naming the differentiable extra inputs (sinks, bias, u, w)."""
    def f(q, k, v, *extra):
        kw = dict(static, **dict(zip(diff, extra)))
        if "u" in kw:
            kw["bias_factors"] = (kw.pop("u"), kw.pop("w"))
        return jaxattn.dot_product_attention(q, k, v, return_lse=True, implementation=impl, **kw)
    return f


B, T, S, N, K, H = 2, 19, 23, 4, 2, 8  # odd lengths, GQA with 2 query heads per kv head
SINKS = (N,)
CASES = {
    "soft_cap_bias_window": (dict(logits_soft_cap=1.5, local_window_size=(4, 2)), {"bias": (1, N, T, S)}),
    "per_head_windows_sinks": (dict(is_causal=True, local_window_size=[(3, 0), None, (0, 5), (2, 2)]),
                               {"sinks": SINKS}),
    "kv_lengths_decode": (dict(is_causal=True, kv_lengths=jnp.array([23, 9])), {}),
    "block_mask_per_head": (dict(block_mask=_block_mask(1, (B, N, 3, 3)), block_shape=(8, 8), is_causal=True,
                                 query_segment_ids=jnp.array([[0] * 10 + [1] * 9, [0] * 19]),
                                 key_segment_ids=jnp.array([[0] * 12 + [1] * 11, [0] * 23])), {}),
    "block_mask_shared_cap_kv_lengths": (dict(block_mask=_block_mask(2, (1, 1, 4, 3), 0.6), block_shape=(5, 8),
                                              logits_soft_cap=2.0, kv_lengths=jnp.array([17, 23])),
                                         {"sinks": SINKS}),
    "block_mask_with_dense_bias": (dict(block_mask=_block_mask(3, (B, 1, 3, 5)), block_shape=(7, 5)),
                                   {"bias": (B, N, T, S)}),
    "bias_factors_kv_heads": (dict(is_causal=True), {"u": (B, T, N, 3), "w": (B, S, K, 3)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_xla_matches_reference(case):
    static, diff = CASES[case]
    inputs = random_inputs(len(case), _shapes(B, T, S, N, K, H) + list(diff.values()))
    names = ["query", "key", "value", *diff]
    assert_matches_reference(_op("xla", static, diff), _op("reference", static, diff), inputs, names=names)


def test_bias_factors_per_query_head_forward():
    static, diff = dict(local_window_size=3), {"u": (B, T, N, 2), "w": (B, S, N, 2)}  # keys repeated per head
    inputs = random_inputs(3, _shapes(B, T, S, N, K, H) + list(diff.values()))
    assert_matches_reference(_op("xla", static, diff), _op("reference", static, diff), inputs, grads=False)


def test_everything_at_once_bf16():
    static = dict(is_causal=True, logits_soft_cap=3.0, local_window_size=[(9, 0), None, (4, 1), (0, 0)],
                  kv_lengths=jnp.array([20, 23]), block_mask=_block_mask(4, (B, N, 3, 3), 0.7), block_shape=(8, 8))
    diff = {"sinks": SINKS}
    inputs = random_inputs(5, _shapes(B, T, S, N, K, H) + [SINKS])
    assert_matches_reference(_op("xla", static, diff), _op("reference", static, diff), inputs, dtype=jnp.bfloat16,
                             names=["query", "key", "value", "sinks"])


def test_reference_gradients_numerically():
    q, k, v, sinks, u, w = random_inputs(6, _shapes(1, 5, 6, 2, 1, 4) + [(2,), (1, 5, 2, 2), (1, 6, 1, 2)])
    static = dict(is_causal=True, kv_lengths=jnp.array([5]), block_mask=jnp.array([[[[True, False], [True, True]]]]),
                  block_shape=(3, 3), local_window_size=[(1, 1), None])

    def capped(q, k, v, sinks):
        return jaxattn.dot_product_attention(q, k, v, sinks=sinks, logits_soft_cap=1.0, implementation="reference",
                                             **static)

    def factored(q, k, v, u, w):
        return jaxattn.dot_product_attention(q, k, v, bias_factors=(u, w), implementation="reference", **static)

    check_grads(jax.jit(capped), (q, k, v, sinks), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    check_grads(jax.jit(factored), (q, k, v, u, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_sink_semantics_and_empty_rows():
    q, k, v = random_inputs(7, _shapes(1, 4, 6, 2, 2, 4))
    sinks = jnp.array([0.5, -2.0])
    kv_lengths = jnp.array([0])  # nothing valid: every row is empty
    out, lse = jaxattn.dot_product_attention(q, k, v, sinks=sinks, kv_lengths=kv_lengths, return_lse=True,
                                             implementation="xla")
    assert np.all(np.asarray(out) == 0)
    np.testing.assert_allclose(lse, jnp.broadcast_to(sinks[None, :, None], lse.shape))


@settings(max_examples=4)
@given(t=st.integers(1, 30), s=st.integers(1, 30), bq=st.sampled_from([1, 4, 7, 16]), bk=st.sampled_from([2, 5, 8]),
       groups=st.sampled_from([1, 2]), per_head=st.booleans(), causal=st.booleans())
def test_property_block_sparse_any_shape(t, s, bq, bk, groups, per_head, causal):
    n, nq, nk = 2 * groups, -(-t // bq), -(-s // bk)
    mask = _block_mask(t * 31 + s, (1, n if per_head else 1, nq, nk), 0.4)
    static = dict(block_mask=mask, block_shape=(bq, bk), is_causal=causal)
    inputs = random_inputs(t + s, _shapes(1, t, s, n, 2, 4))
    assert_matches_reference(_op("xla", static, {}), _op("reference", static, {}), inputs, grads=False)


def test_block_sparse_xla_never_builds_t_by_s():
    t = s = 256
    q, k, v = random_inputs(8, _shapes(1, t, s, 2, 1, 8))
    mask = _block_mask(9, (1, 2, 8, 8), 0.25)

    def loss(q, k, v):
        return jnp.sum(jaxattn.dot_product_attention(q, k, v, block_mask=mask, block_shape=(32, 32),
                                                     implementation="xla"))

    eqns = jaxpr_equations(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    biggest = max(int(np.prod(var.aval.shape)) for e in eqns for var in e.outvars if hasattr(var.aval, "shape"))
    assert biggest < t * s, biggest
    assert any(e.primitive.name == "while" for e in eqns)


def test_backward_api_with_sinks_and_soft_cap():
    q, k, v, sinks, d_out = random_inputs(10, _shapes(1, 9, 11, 4, 2, 8) + [(4,), (1, 9, 4, 8)])
    kw = dict(is_causal=True, logits_soft_cap=2.0, local_window_size=[(2, 0), None, (5, 0), (1, 0)])

    def forward(q, k, v, sinks):
        return jaxattn.dot_product_attention(q, k, v, sinks=sinks, return_lse=True, implementation="reference", **kw)

    (out, lse), vjp = jax.vjp(forward, q, k, v, sinks)
    d_lse = jnp.ones_like(lse)
    want = vjp((d_out, d_lse))
    got = jax.jit(functools.partial(jaxattn.dot_product_attention_backward, implementation="xla", **kw))(
        q, k, v, out, lse, d_out, d_lse=d_lse, sinks=sinks)
    for name, a, r in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert_allclose(a, r, kind="grad", name=name)


def test_kernels_take_the_features_natively():
    """The flash kernels handle sinks, soft cap, per-head windows, kv_lengths and block masks themselves (their own
    numerics: tests/kernels/test_flash_attention_features*.py); through the op they match the reference."""
    q, k, v = random_inputs(11, _shapes(1, 8, 8, 2, 2, 8))
    assert api.flash_supports(features=frozenset({"logits_soft_cap", "head_windows", "kv_lengths", "block_mask"}))
    kw = dict(logits_soft_cap=5.0, sinks=jnp.array([0.5, -1.0]), local_window_size=[(2, 0), None],
              kv_lengths=jnp.array([6], jnp.int32), is_causal=True, return_lse=True)
    got = jaxattn.dot_product_attention(q, k, v, implementation="pallas", **kw)
    want = jaxattn.dot_product_attention(q, k, v, implementation="reference", **kw)
    for a, r in zip(got, want):
        assert_allclose(a, r, name="pallas vs reference")


BAD = [
    (dict(sinks=jnp.zeros((3,))), r"`sinks` must have shape \(4,\)"),
    (dict(sinks=jnp.zeros((4,), jnp.int32)), "sinks"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(local_window_size=[(1, 1)] * 3), "per query head: got 3 for 4"),
    (dict(local_window_size=[(1, 1), (1, -1), None, None]), r"local_window_size\[1\]"),
    (dict(kv_lengths=jnp.array([3, 4, 5])), r"`kv_lengths` .* shape \(2,\)"),
    (dict(kv_lengths=jnp.array([3.0, 4.0])), "kv_lengths.*float32"),
    (dict(block_mask=jnp.ones((1, 1, 2, 2), bool), block_shape=(3, 4)), r"`block_mask` of shape \(1, 1, 2, 2\)"),
    (dict(block_mask=jnp.ones((1, 1, 2, 2), bool)), "block_shape"),
    (dict(block_mask=jnp.ones((1, 1, 2, 2), int), block_shape=(4, 4)), "boolean"),
    (dict(block_shape=(4, 4)), "without a `block_mask`"),
    (dict(bias_factors=(jnp.zeros((2, 8, 4, 2)), jnp.zeros((2, 8, 3, 2)))), r"`bias_factors` .* w \(2, 8, 3, 2\)"),
    (dict(bias_factors=(jnp.zeros((2, 8, 4, 2)), jnp.zeros((2, 8, 2, 3)))), "bias_factors"),
    (dict(bias_factors=(jnp.zeros((2, 8, 4, 2)), jnp.zeros((2, 8, 2, 2))), logits_soft_cap=5.0), "cannot be combined"),
]


@pytest.mark.parametrize("kw,match", BAD)
def test_bad_inputs_raise_value_error(kw, match):
    q, k, v = random_inputs(12, _shapes(2, 8, 8, 4, 2, 8))
    with pytest.raises(ValueError, match=match):
        jaxattn.dot_product_attention(q, k, v, **kw)
