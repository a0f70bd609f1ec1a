"""dot_product_attention: blocked XLA path vs the materialising reference, jax.nn parity, masks, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxattn
from jaxattn.dot_product import common, reference, xla
from jaxattn.testing import assert_allclose, assert_matches_reference, random_inputs

BLOCK_K = 16  # small blocks, so every case below spans several key blocks and a padded tail


def _shapes(b, t, s, n, k, h, hv=None):
    return [(b, t, n, h), (b, s, k, h), (b, s, k, hv or h)]


def _api(impl, **kw):
    def f(q, k, v, *bias):
        return jaxattn.dot_product_attention(q, k, v, *bias, implementation=impl, return_lse=True, **kw)
    return f


def _blocked(**kw):
    """The xla path with BLOCK_K, through the same argument handling as the public API."""
    def f(q, k, v, *bias):
        spec, scale = _spec_and_scale(q, k, kw)
        return xla.attention_blocked(q, k, v, bias[0] if bias else None, kw.get("mask"),
                                     kw.get("query_segment_ids"), kw.get("key_segment_ids"),
                                     scale=scale, spec=spec, block_k=BLOCK_K)
    return f


def _spec_and_scale(q, k, kw):
    from jaxattn.core import masks
    window = masks.normalize_window(kw.get("local_window_size"))
    spec = common.MaskSpec(kw.get("is_causal", False), window, k.shape[1] - q.shape[1])
    return spec, kw.get("scale") or q.shape[-1] ** -0.5


CASES = [
    # (B, T, S, N, K, H, Hv), options
    ((2, 7, 7, 2, 2, 8, 8), {}),
    ((1, 130, 130, 4, 2, 16, 16), {"is_causal": True}),
    ((1, 1, 37, 4, 1, 8, 8), {"is_causal": True}),  # decoding: one query, bottom-right aligned
    ((2, 33, 70, 4, 4, 8, 12), {"is_causal": True}),  # T < S, Hv != H
    ((1, 70, 33, 2, 1, 8, 8), {"is_causal": True}),  # T > S: the first 37 queries see nothing
    ((1, 50, 50, 3, 3, 8, 8), {"local_window_size": (5, 3)}),
    ((1, 50, 40, 2, 2, 8, 8), {"local_window_size": 4, "is_causal": True}),
    ((2, 40, 40, 4, 2, 8, 8), {"scale": 0.3}),
]


@pytest.mark.parametrize("dims,opts", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_matches_reference(dims, opts, dtype):
    b, t, s, n, k, h, hv = dims
    inputs = random_inputs(1, _shapes(b, t, s, n, k, h, hv))
    assert_matches_reference(_blocked(**opts), _api("reference", **opts), inputs, dtype=dtype,
                             names=["query", "key", "value"])


@pytest.mark.parametrize("bias_shape", [(2, 4, 9, 21), (1, 4, 1, 21), (9, 21), (2, 1, 9, 1)])
def test_bias_and_its_gradient(bias_shape):
    inputs = random_inputs(2, _shapes(2, 9, 21, 4, 2, 8) + [bias_shape])
    assert_matches_reference(_blocked(is_causal=True), _api("reference", is_causal=True), inputs,
                             names=["query", "key", "value", "bias"])


def test_segments_and_mask_with_gqa():
    b, t, s = 2, 19, 19
    q_seg = jnp.array([[0] * 5 + [1] * 9 + [2] * 5, [0] * 19])
    mask = jax.random.bernoulli(jax.random.key(3), 0.8, (b, 1, t, s))
    opts = dict(query_segment_ids=q_seg, key_segment_ids=q_seg, mask=mask, is_causal=True)
    inputs = random_inputs(4, _shapes(b, t, s, 4, 2, 8))
    for dtype in (jnp.float32, jnp.bfloat16):
        assert_matches_reference(_blocked(**opts), _api("reference", **opts), inputs, dtype=dtype)


def test_public_xla_path_matches_reference_at_default_block():
    inputs = random_inputs(5, _shapes(1, 600, 600, 2, 1, 8))  # 2 key blocks of 512, padded tail
    assert_matches_reference(_api("xla", is_causal=True), _api("reference", is_causal=True), inputs)


@pytest.mark.parametrize("opts", [{}, {"is_causal": True}, {"local_window_size": (4, 2)}, {"local_window_size": 3}])
def test_agrees_with_jax_nn_where_features_overlap(opts):
    q, k, v = random_inputs(6, _shapes(2, 24, 24, 4, 2, 8))
    bias = random_inputs(7, [(1, 4, 24, 24)])[0]
    # Keep the diagonal: jax.nn gives fully masked rows the mean of the values, we give 0 (documented).
    mask = jax.random.bernoulli(jax.random.key(8), 0.9, (2, 1, 24, 24)) | jnp.eye(24, dtype=bool)
    ours = jaxattn.dot_product_attention(q, k, v, bias, mask, **opts)
    theirs = jax.nn.dot_product_attention(q, k, v, bias, mask, implementation="xla", **opts)
    assert_allclose(ours, theirs)


def test_reference_matches_textbook_formula():
    q, k, v = random_inputs(9, _shapes(2, 11, 17, 6, 3, 8))
    for causal in (False, True):
        ours = jaxattn.dot_product_attention(q, k, v, is_causal=causal, implementation="reference")
        assert_allclose(ours, reference.attention_naive(q, k, v, is_causal=causal))


def test_reference_gradients_numerically():
    q, k, v, bias = random_inputs(10, _shapes(1, 5, 6, 2, 1, 4) + [(1, 2, 5, 6)])
    f = functools.partial(jaxattn.dot_product_attention, is_causal=True, implementation="reference")
    check_grads(f, (q, k, v, bias), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fully_masked_rows_are_zero_with_finite_gradients(impl):
    q, k, v = random_inputs(11, _shapes(1, 6, 6, 2, 2, 4))
    mask = jnp.ones((1, 1, 6, 6), bool).at[:, :, 2].set(False)  # query 2 sees nothing

    def loss(q, k, v):
        out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, return_lse=True, implementation=impl)
        return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, return_lse=True, implementation=impl)
    assert np.all(np.asarray(out[:, 2]) == 0) and np.all(np.isneginf(np.asarray(lse[:, :, 2])))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert np.all(np.asarray(grads[0][:, 2]) == 0)


def test_lse_is_logsumexp_of_scaled_logits():
    q, k, v = random_inputs(12, _shapes(1, 9, 13, 2, 2, 8))
    _, lse = jaxattn.dot_product_attention(q, k, v, return_lse=True, implementation="xla")
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * 8 ** -0.5
    assert lse.dtype == jnp.float32
    assert_allclose(lse, jax.nn.logsumexp(logits, axis=-1))


def test_bf16_in_bf16_out_and_jit():
    q, k, v = random_inputs(13, _shapes(1, 16, 16, 2, 2, 8), dtype=jnp.bfloat16)
    out = jax.jit(functools.partial(jaxattn.dot_product_attention, is_causal=True))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 16, 2, 8)


@given(t=st.integers(1, 40), s=st.integers(1, 40), groups=st.sampled_from([1, 2, 3]), kv=st.sampled_from([1, 2]),
       causal=st.booleans(), window=st.one_of(st.none(), st.tuples(st.integers(0, 6), st.integers(0, 6))))
def test_property_any_shape_matches_reference(t, s, groups, kv, causal, window):
    inputs = random_inputs(t * 41 + s, _shapes(1, t, s, kv * groups, kv, 4))
    opts = dict(is_causal=causal, local_window_size=window)
    assert_matches_reference(_blocked(**opts), _api("reference", **opts), inputs, grads=False)


BAD = [
    (lambda q, k, v: jaxattn.dot_product_attention(q[0], k, v), "query"),  # rank 3
    (lambda q, k, v: jaxattn.dot_product_attention(q, k[..., :4], v), "head_dim"),
    (lambda q, k, v: jaxattn.dot_product_attention(q[:, :, :3], k, v), "multiple"),  # 3 heads vs 2 kv heads
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v[:, :5]), "kv_len"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k[:1], v[:1]), "batch"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, local_window_size=-1), "local_window_size"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, local_window_size=(1, 2, 3)), "local_window_size"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, jnp.zeros((3, 8, 8))), "bias"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=jnp.ones((8, 8))), "mask"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, query_segment_ids=jnp.zeros((2, 8), int)),
     "key_segment_ids"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, query_segment_ids=jnp.zeros((2, 7), int),
                                                   key_segment_ids=jnp.zeros((2, 8), int)), "query_segment_ids"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k.astype(jnp.bfloat16), v), "dtype"),
    (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation="cuda"), "implementation"),
    (lambda q, k, v: jaxattn.dot_product_attention(q.astype(jnp.int32), k, v), "floating"),
]


@pytest.mark.parametrize("call,match", BAD)
def test_bad_inputs_raise_value_error(call, match):
    q, k, v = random_inputs(14, _shapes(2, 8, 8, 4, 2, 8))
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
