"""Issue 17 in the language models: packed documents (segment ids) in both families equal each document alone;
gated attention, attention sinks and mixture-of-heads in the softmax LM against their formulas, their parameter
counts, the MoH load-balance loss reaching the task's loss; the input pipeline's segment ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models import create_model
from jaxattn.models.layers import auxiliary
from jaxattn.models.softmax_lm.heads import HeadRouter, OutputGate
from jaxattn.testing.model_init import abstract_model
from jaxattn.train import input_pipeline, tasks

FAST_COMPILE = {"xla_backend_optimization_level": 0}

SMALL = dict(d_model=32, num_layers=2, num_heads=4, glu_dim=48)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 13)), jnp.int32)
SEGMENTS = jnp.asarray([[4] * 5 + [2] * 8, [1] * 13], jnp.int32)  # row 0: documents of 5 and 8 tokens


def _params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["softmax_lm_tiny", "transnormer_tiny"])
def test_packed_documents_equal_each_document_alone(name):
    """A document's logits do not depend on the document before it (rotary / LRPE are relative, so positions do
    not matter either); a row of one document is the unsegmented forward."""
    model = create_model(name, rngs=nnx.Rngs(0), **SMALL)
    packed = jax.jit(lambda t, s: model(t, segment_ids=s))(TOKENS, SEGMENTS)
    alone = jax.jit(lambda t: model(t))
    np.testing.assert_allclose(packed[0, 5:], alone(TOKENS[:1, 5:])[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, :5], alone(TOKENS[:1, :5])[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[1], alone(TOKENS[1:])[0], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="`segment_ids` are for the full-sequence forward"):
        model(TOKENS, cache=model.init_cache(2, 16), segment_ids=SEGMENTS)
    with pytest.raises(ValueError, match="`segment_ids` must be integer with the shape of `tokens`"):
        model(TOKENS, segment_ids=SEGMENTS[:, :4])


def test_gate_parameters_and_formula():
    base = _params(create_model("softmax_lm_tiny", rngs=nnx.Rngs(0), **SMALL))
    d, n, h, layers = 32, 4, 8, 2
    for kind, extra in (("headwise", d * n), ("elementwise", d * n * h)):
        gated = create_model("softmax_lm_tiny", rngs=nnx.Rngs(0), attention_gate=kind, **SMALL)
        assert _params(gated) - base == layers * extra
        gate = OutputGate(d, n, h, kind, rngs=nnx.Rngs(1))
        x = jax.random.normal(jax.random.key(0), (2, 3, d))
        o = jax.random.normal(jax.random.key(1), (2, 3, n, h))
        w = gate.proj.kernel[...]
        want = o * jax.nn.sigmoid(jnp.einsum("btd,dn->btn", x, w)[..., None] if kind == "headwise"
                                  else jnp.einsum("btd,dnh->btnh", x, w))
        np.testing.assert_allclose(gate(x, o), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="`attention_gate` must be None or one of"):
        OutputGate(d, n, h, "per_token", rngs=nnx.Rngs(0))


def test_moh_weights_and_balance_loss():
    router = HeadRouter(16, 6, (2, 4, 3), balance_weight=0.5, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    g = router(x)
    mix = jax.nn.softmax(x @ router.w_mix.kernel[...], axis=-1)
    np.testing.assert_allclose(g[..., :2], mix[..., :1] * jax.nn.softmax(x @ router.w_shared.kernel[...], -1),
                               rtol=1e-5, atol=1e-6)
    logits = x @ router.w_routed.kernel[...]
    probs = jax.nn.softmax(logits, -1)
    chosen = logits >= jnp.sort(logits, -1)[..., 1:2]  # the top 3 of 4
    np.testing.assert_allclose(g[..., 2:], jnp.where(chosen, mix[..., 1:] * probs, 0.0), rtol=1e-5, atol=1e-6)
    assert (np.count_nonzero(np.asarray(g[..., 2:]), axis=-1) == 3).all()
    balance = 0.5 * jnp.sum(chosen.mean((0, 1)) * probs.mean((0, 1)))
    np.testing.assert_allclose(router.balance_loss.value, balance, rtol=1e-5)
    for bad in ((2, 3, 2), (0, 6, 2), (2, 4, 5), (2, 4)):
        with pytest.raises(ValueError, match="`heads_routing`"):
            HeadRouter(16, 6, bad, rngs=nnx.Rngs(0))


def test_moh_model_adds_its_balance_loss_to_the_task_loss():
    base = _params(create_model("softmax_lm_tiny", rngs=nnx.Rngs(0), **SMALL))
    model = create_model("softmax_lm_tiny", rngs=nnx.Rngs(0), heads_routing=(1, 3, 2), **SMALL)
    assert _params(model) - base == 2 * 32 * (1 + 3 + 2)
    task = tasks.LanguageModel(None, 260)
    batch = {"inputs": TOKENS, "targets": TOKENS, "segment_ids": SEGMENTS}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, rest, batch):  # the model state is an argument, as in the train step
        return task.train_loss(nnx.merge(graphdef, p, rest, copy=True), batch, None)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest, batch)
    assert float(metrics["auxiliary_loss"]) > 0
    np.testing.assert_allclose(value, metrics["bits_per_byte"] * np.log(2) + metrics["auxiliary_loss"], rtol=1e-5)
    router_grads = [g for path, g in nnx.to_flat_state(grads) if "w_routed" in str(path)]
    assert router_grads and all(float(jnp.abs(g.get_value()).max()) > 0 for g in router_grads)
    assert float(auxiliary.total(create_model("softmax_lm_tiny", rngs=nnx.Rngs(0), **SMALL))) == 0.0


def test_sinks_variant():
    model = create_model("softmax_lm_tiny", rngs=nnx.Rngs(0), attention_sinks=True, **SMALL)
    base = create_model("softmax_lm_tiny", rngs=nnx.Rngs(0), **SMALL)
    assert _params(model) - _params(base) == 2 * 4
    logits = model(TOKENS, segment_ids=SEGMENTS)
    assert bool(jnp.isfinite(logits).all())
    # A sink at -inf adds nothing to the denominator: the baseline.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, -1e30) if "sinks" in jax.tree_util.keystr(path) else x,
        nnx.state(model, nnx.Param))
    nnx.update(model, params)
    np.testing.assert_allclose(model(TOKENS), base(TOKENS), atol=1e-5, rtol=1e-5)


def test_pipeline_segment_ids():
    eos = input_pipeline.EOS
    np.testing.assert_array_equal(input_pipeline.document_segments([1, 2, eos, 5, eos, eos, 7]),
                                  [0, 0, 1, 1, 2, 3, 3])
    tokens = np.asarray([1, 2, 3, eos, 4, 5, eos, 6, 7, 8, 9], np.uint16)
    windows = input_pipeline.TokenWindows(tokens, 5, segments=True)
    item = windows[0]
    np.testing.assert_array_equal(item["inputs"], [1, 2, 3, eos, 4])
    np.testing.assert_array_equal(item["segment_ids"], [0, 0, 0, 1, 1])
    assert "segment_ids" not in input_pipeline.TokenWindows(tokens, 5)[0]


@pytest.mark.devices(8)
def test_packed_documents_and_sinks_under_context_parallelism():
    """The softmax LM with packed documents and attention sinks gives the same logits with its sequence split over
    a context axis of 4 (ring, all-gather, Ulysses) as on one device."""
    from jaxattn.train import sharding

    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 64)))
    segments = jnp.asarray(np.repeat(np.array([[0] * 20 + [1] * 30 + [2] * 14]), 2, 0))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "context": 4})

    def forward(model):  # compiled without XLA's backend optimisations (compile time dominates)
        graph, state = nnx.split(model)
        run = lambda state, x, s: nnx.merge(graph, state)(x, segment_ids=s)  # noqa: E731
        out = jax.jit(run).lower(state, tokens, segments).compile(FAST_COMPILE)(state, tokens, segments)
        return np.asarray(out[0] if isinstance(out, tuple) else out)

    # One set of weights (random, no eager init) for every strategy; on one device they all run the same op.
    weights = None
    for strategy in ("ring", "allgather", "ulysses"):
        model = abstract_model(lambda: create_model("softmax_lm_tiny", context_parallel=strategy, attention_sinks=True,
                                                    rngs=nnx.Rngs(0)))
        if weights is None:
            sinks = [v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and "sinks" in path]
            assert sinks
            for param in sinks:
                param[...] = np.broadcast_to(np.linspace(-1.0, 2.0, param.shape[-1], dtype=np.float32), param.shape)
            weights, single = nnx.state(model), forward(model)
        nnx.update(model, weights)
        with jax.set_mesh(mesh):
            split = forward(model)
        np.testing.assert_allclose(split, single, atol=2e-5, err_msg=strategy)
