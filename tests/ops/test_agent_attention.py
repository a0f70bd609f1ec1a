"""Agent attention: the two-pass path (two `dot_product_attention` calls) against the materialised reference,
forward and gradients (query, key, value, agents and both biases), fp32/bf16, odd lengths, GQA, broadcast biases,
the flash kernel through `implementation=`, the reference against the formula written out and numerically
differentiated, memory far below quadratic, bad inputs, and a hypothesis sweep over shapes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxattn
from jaxattn.agent import reference
from jaxattn.testing import assert_allclose, assert_matches_reference

NAMES = ["query", "key", "value", "agents", "key_bias", "query_bias"]


def _inputs(seed, b, t, s, n, kv, h, hv, agents, key_bias_shape=None, query_bias_shape=None):
    """q, k, v, agents and the two biases (default: per-head `[N, n, S]` and `[N, T, n]`, as the layer uses)."""
    rng = np.random.default_rng(seed)
    key_bias_shape = (n, agents, s) if key_bias_shape is None else key_bias_shape
    query_bias_shape = (n, t, agents) if query_bias_shape is None else query_bias_shape
    shapes = ((b, t, n, h), (b, s, kv, h), (b, s, kv, hv), (b, agents, n, h), key_bias_shape, query_bias_shape)
    return tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes)


def _op(implementation=None, scale=None):
    def run(q, k, v, a, key_bias, query_bias):
        return jaxattn.agent_attention(q, k, v, a, key_bias=key_bias, query_bias=query_bias, scale=scale,
                                       implementation=implementation)
    return run


# (b, t, s, n, kv, h, hv, agents): odd lengths, GQA (4 query heads over 2 kv heads), a value width other than the
# head dim, the paper's 7 x 7 agents.
SIZES = (2, 7, 130, 4, 2, 8, 5, 49)


@pytest.mark.parametrize("dtype, key_bias_shape, query_bias_shape", [
    (jnp.float32, (2, 1, 49, 130), (49,)),  # biases broadcast over heads: batch-dependent keys, one logit per agent
    (jnp.bfloat16, None, None),  # per-head biases, as the layer passes them
])
def test_two_pass_matches_reference(dtype, key_bias_shape, query_bias_shape):
    """Outputs and the gradients of all six inputs (bias gradients reduced to the biases' own shapes)."""
    inputs = _inputs(0, *SIZES, key_bias_shape=key_bias_shape, query_bias_shape=query_bias_shape)
    assert_matches_reference(_op(scale=0.3), _op("reference", scale=0.3), inputs, dtype=dtype, names=NAMES)


def test_without_biases_and_with_the_flash_kernel():
    """No biases; and `implementation='pallas'` (the flash kernel, interpreted on CPU) in both calls."""
    q, k, v, a, key_bias, query_bias = _inputs(2, 1, 7, 20, 2, 1, 8, 8, 3)

    @jax.jit
    def forms(q, k, v, a, key_bias, query_bias):
        return (jaxattn.agent_attention(q, k, v, a), jaxattn.agent_attention(q, k, v, a, implementation="reference"),
                _op("pallas")(q, k, v, a, key_bias, query_bias), _op("reference")(q, k, v, a, key_bias, query_bias))

    no_bias, no_bias_reference, flash, reference_out = forms(q, k, v, a, key_bias, query_bias)
    assert_allclose(no_bias, no_bias_reference)
    assert_allclose(flash, reference_out)


def test_reference_is_the_formula():
    """The reference equals the two softmaxes written out with jax.nn.softmax (GQA by repeating k/v heads)."""
    q, k, v, a, key_bias, query_bias = _inputs(3, 1, 130, 66, 4, 2, 16, 8, 49)
    scale = 0.25

    @jax.jit
    def written_out(q, k, v, a, key_bias, query_bias):
        k2, v2 = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        agent_values = jnp.einsum("bnas,bsnd->band", jax.nn.softmax(
            jnp.einsum("band,bsnd->bnas", a, k2) * scale + key_bias, axis=-1), v2)
        want = jnp.einsum("bnta,band->btnd", jax.nn.softmax(
            jnp.einsum("btnd,band->bnta", q, a) * scale + query_bias, axis=-1), agent_values)
        return reference.agent_attention_reference(q, k, v, a, key_bias, query_bias, scale=scale), want

    assert_allclose(*written_out(q, k, v, a, key_bias, query_bias))


def test_reference_gradients_numerically():
    inputs = _inputs(4, 1, 3, 5, 2, 1, 2, 2, 2)
    f = functools.partial(reference.agent_attention_reference, scale=0.7)
    check_grads(jax.jit(f), inputs, order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_memory_is_not_quadratic():
    """Compiled forward + backward temporaries of the default path at 16k tokens: a few percent of one `T x S` fp32
    logit matrix (linearity over 4k / 16k / 64k: `benchmarks/agent_attention.py`)."""
    tokens = 16384
    spec = jax.ShapeDtypeStruct((1, tokens, 1, 16), jnp.float32)
    agents = jax.ShapeDtypeStruct((1, 49, 1, 16), jnp.float32)
    loss = lambda q, k, v, a: jnp.sum(jaxattn.agent_attention(q, k, v, a))  # noqa: E731
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(spec, spec, spec, agents).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * tokens ** 2 * 4


def test_bad_inputs_raise_value_errors_naming_the_argument():
    q, k, v, a, key_bias, query_bias = _inputs(5, 2, 7, 130, 2, 2, 8, 5, 9)
    with pytest.raises(ValueError, match="`agents` must have rank 4"):
        jaxattn.agent_attention(q, k, v, a[0])
    with pytest.raises(ValueError, match="`agents` num_heads"):
        jaxattn.agent_attention(q, k, v, a[:, :, :1])
    with pytest.raises(ValueError, match="`agents` head_dim"):
        jaxattn.agent_attention(q, k, v, a[..., :4])
    with pytest.raises(ValueError, match="`agents` batch size"):
        jaxattn.agent_attention(q, k, v, a[:1])
    with pytest.raises(ValueError, match="at least one agent"):
        jaxattn.agent_attention(q, k, v, a[:, :0])
    with pytest.raises(ValueError, match="`value` kv_len"):
        jaxattn.agent_attention(q, k, v[:, :5], a)
    with pytest.raises(ValueError, match=r"`query` heads \(2\) must be a multiple"):
        jaxattn.agent_attention(q, jnp.concatenate([k] * 3, 2), jnp.concatenate([v] * 3, 2), a)
    with pytest.raises(ValueError, match="one dtype"):
        jaxattn.agent_attention(q, k, v, a.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"`key_bias` of shape \(2, 9, 7\) does not broadcast to \[B, N, n, S\]"):
        jaxattn.agent_attention(q, k, v, a, key_bias=key_bias[..., :7])
    with pytest.raises(ValueError, match=r"`query_bias` of shape \(2, 9, 7\) does not broadcast to \[B, N, T, n\]"):
        jaxattn.agent_attention(q, k, v, a, query_bias=jnp.swapaxes(query_bias, 1, 2))
    with pytest.raises(ValueError, match="`key_bias` must be a floating"):
        jaxattn.agent_attention(q, k, v, a, key_bias=jnp.zeros((9, 130), jnp.int32))
    with pytest.raises(ValueError, match="`implementation` must be one of"):
        jaxattn.agent_attention(q, k, v, a, implementation="dense")


@settings(max_examples=3)
@given(st.integers(1, 2), st.integers(1, 40), st.integers(1, 40), st.sampled_from([(1, 1), (2, 1), (2, 2)]),
       st.integers(1, 12), st.booleans())
@example(1, 1, 1, (1, 1), 1, True)  # one query, one key, one agent
def test_property_two_pass_matches_reference(b, t, s, heads, agents, biased):
    n, kv = heads
    q, k, v, a, key_bias, query_bias = _inputs(6, b, t, s, n, kv, 4, 3, agents)
    key_bias, query_bias = (key_bias, query_bias) if biased else (None, None)

    @jax.jit
    def both(q, k, v, a, key_bias, query_bias):
        return tuple(jaxattn.agent_attention(q, k, v, a, key_bias=key_bias, query_bias=query_bias,
                                             implementation=implementation) for implementation in (None, "reference"))

    got, want = both(q, k, v, a, key_bias, query_bias)
    assert got.shape == (b, t, n, 3)
    assert_allclose(got, want)
