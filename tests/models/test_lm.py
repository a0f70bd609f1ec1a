"""Language models: decode == full sequence, exact parameter counts, jit forward/grad, GQA, generate, errors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import models
from jaxattn.models.lm import count_params, lrpe

# Exact counts (see each variant's docstring); derived from the published configurations.
PARAM_COUNTS = {
    "transnormer_tiny": 935_040,
    "transnormer_385m": 464_520_192,
    "transnormer_1b": 1_151_338_496,
    "transnormer_7b": 7_098_863_616,
    "softmax_lm_tiny": 935_424,
    "softmax_lm_385m": 464_494_592,
    "softmax_lm_1b": 1_151_369_216,
    "softmax_lm_7b": 7_098_736_640,
}
# Small enough to compile fast; 3 layers so LRPE (layer 0) and a scanned segment of two plain layers are exercised.
SMALL = dict(d_model=32, num_layers=3, num_heads=4, vocab_size=64)
FAMILIES = {
    "transnormer": ("transnormer_tiny", dict(block_size=4)),  # block 4: chunk borders inside every prefill
    "softmax": ("softmax_lm_tiny", {}),
    "softmax_gqa": ("softmax_lm_tiny", dict(num_kv_heads=2)),
}


@functools.cache
def small_model(family):
    name, extra = FAMILIES[family]
    return models.create_model(name, rngs=nnx.Rngs(0), **SMALL, **extra)


def tokens(shape, seed=0, vocab=SMALL["vocab_size"]):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@functools.cache
def compiled_call(family):
    """jit(model(tokens, cache)) on split state: one compile per (family, token length)."""
    graphdef, state = nnx.split(small_model(family))

    @jax.jit
    def call(tok, cache):
        return nnx.merge(graphdef, state)(tok, cache=cache)
    return call


@functools.cache
def compiled_full(family):
    graphdef, state = nnx.split(small_model(family))
    return jax.jit(lambda tok: nnx.merge(graphdef, state)(tok))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_matches_full_sequence(family):
    model = small_model(family)
    tok = tokens((2, 13), seed=1)
    full = compiled_full(family)(tok)
    call = compiled_call(family)
    cache = model.init_cache(2, 14)
    pieces = []
    for start, stop in ((0, 5), (5, 10)):  # the prompt in two prefill calls (block 4 does not divide 5)
        out, cache = call(tok[:, start:stop], cache)
        pieces.append(out)
    for t in range(10, 13):
        out, cache = call(tok[:, t:t + 1], cache)
        pieces.append(out)
    assert int(cache.pos) == 13
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)
    assert np.abs(full).max() > 1e-2  # not trivially zero


def test_transnormer_state_is_constant_size():
    model = small_model("transnormer")
    assert model.segment_bounds == ((0, 1), (1, 2))  # layer 0 (LRPE) and the rest are separate scans
    for max_len in (8, 4096):
        shapes = [s.shape for s in model.init_cache(2, max_len).layers]
        assert shapes == [(1, 2, 4, 16, 8), (2, 2, 4, 8, 8)]  # LRPE doubles layer 0's key dim


def test_gqa_baseline():
    model = small_model("softmax_gqa")
    attn = model.segments[0].blocks.mixer  # the layers stacked: [layers, embed, heads, head_dim]
    assert attn.k_proj.kernel.shape == (3, 32, 2, 8) and attn.q_proj.kernel.shape == (3, 32, 4, 8)
    assert model.init_cache(1, 10).layers[0][0].shape == (3, 1, 10, 2, 8)


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_counts(name):
    model = nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0)))
    assert count_params(model) == PARAM_COUNTS[name]


def test_registry_and_matched_sizes():
    tiny = nnx.eval_shape(lambda: models.create_model("transnormer_tiny", rngs=nnx.Rngs(0)))
    assert tiny.vocab_size == 260  # bytes + 4 specials
    names = set(models.list_models(kind="lm"))
    variants = {n for n in names if n.endswith(("_gated", "_moh", "_sinks"))}  # counted in test_lm_variants
    assert names - variants == set(PARAM_COUNTS)
    assert variants == {f"softmax_lm_{s}_{v}" for s in ("385m", "1b", "7b") for v in ("gated", "moh", "sinks")}
    for size in ("tiny", "385m", "1b", "7b"):
        linear, softmax = PARAM_COUNTS[f"transnormer_{size}"], PARAM_COUNTS[f"softmax_lm_{size}"]
        assert abs(softmax - linear) / linear < 0.02
    for name in PARAM_COUNTS:
        assert f"{PARAM_COUNTS[name]:,}" in models.get_entry(name).doc
    gqa = nnx.eval_shape(lambda: models.create_model("softmax_lm_385m", rngs=nnx.Rngs(0), num_kv_heads=2))
    assert abs(count_params(gqa) - PARAM_COUNTS["transnormer_385m"]) / PARAM_COUNTS["transnormer_385m"] < 0.02


@pytest.mark.parametrize("family", ["transnormer", "softmax"])
def test_forward_and_grad_finite_under_jit(family):
    model = small_model(family)
    tok = tokens((2, 19), seed=3)

    @nnx.jit
    def loss_and_grad(m, t):
        def loss(m):
            logits = m(t[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))
        return nnx.value_and_grad(loss)(m)

    loss, grads = loss_and_grad(model, tok)
    assert np.isfinite(loss) and abs(float(loss) - np.log(SMALL['vocab_size'])) < 1.0  # near-uniform at init
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert all(np.abs(g).max() > 0 for g in leaves)  # every parameter (LRPE angles included) gets a gradient


def test_lrpe_depends_on_relative_offset_only():
    theta = jax.random.uniform(jax.random.key(0), (2, 3))
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 2, 3))
    def dot(tq, tk):
        return jnp.sum(lrpe(q, theta, tq) * lrpe(k, theta, tk), axis=-1)
    np.testing.assert_allclose(dot(5, 2), dot(13, 10), atol=1e-5)


@pytest.mark.parametrize("family", ["transnormer", "softmax"])
def test_generate(family):
    model = small_model(family)
    prompt = tokens((2, 4), seed=4)
    greedy = models.generate(model, prompt, 3)
    assert greedy.shape == (2, 3) and greedy.dtype == jnp.int32
    np.testing.assert_array_equal(models.generate(model, prompt, 3), greedy)
    # each greedy token is the argmax of the full-sequence logits at the position before it
    full = compiled_full(family)(jnp.concatenate([prompt, greedy.astype(prompt.dtype)], axis=1))
    np.testing.assert_array_equal(jnp.argmax(full[:, 3:-1], axis=-1), greedy)
    a = models.generate(model, prompt, 3, temperature=1.0, rng=jax.random.key(7))
    np.testing.assert_array_equal(models.generate(model, prompt, 3, temperature=1.0, rng=jax.random.key(7)), a)
    assert ((0 <= np.asarray(a)) & (np.asarray(a) < SMALL["vocab_size"])).all()


def test_bad_inputs():
    model = small_model("transnormer")
    with pytest.raises(ValueError, match="rank 2"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 5), jnp.float32))
    with pytest.raises(ValueError, match="vocab_size"):
        model(jnp.full((1, 3), SMALL["vocab_size"], jnp.int32))
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, 5), jnp.int32), cache=cache)
    _, cache = model(jnp.zeros((1, 3), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="too long for the cache"):
        model(jnp.zeros((1, 2), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(jnp.zeros((2, 1), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, 0)
    with pytest.raises(ValueError, match="rng"):
        models.generate(model, jnp.zeros((1, 2), jnp.int32), 2, temperature=0.5)
    with pytest.raises(ValueError, match="steps"):
        models.generate(model, jnp.zeros((1, 2), jnp.int32), 0)
    with pytest.raises(ValueError, match="num_classes"):
        models.create_model("transnormer_tiny", num_classes=10)


def test_cache_overflow_under_jit_poisons_logits():
    model = small_model("softmax")
    call = compiled_call("softmax")
    cache = model.init_cache(1, 2)
    out, cache = call(jnp.zeros((1, 1), jnp.int32), cache)
    assert np.isfinite(out).all()
    out, cache = call(jnp.zeros((1, 1), jnp.int32), cache)
    assert np.isfinite(out).all()
    out, _ = call(jnp.zeros((1, 1), jnp.int32), cache)  # third token in a 2-token cache: cannot raise under jit
    assert np.isnan(out).all()
