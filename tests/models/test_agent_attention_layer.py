"""The `AgentAttention` layer and the `agent_vit_pico` test model: the layer against the paper's formula written out
densely, its pooling and bias resizing against torch, exact parameter counts, bad inputs, a drop-in swap into
DiNAT's block, and a short training run whose loss falls."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn import models
from jaxattn.models.dinat.model import NATLayer
from jaxattn.models.layers.agent_attention import AgentAttention, pool_agents, resize_table
from jaxattn.testing import assert_allclose
from jaxattn.testing.model_init import abstract_model


def _dense_layer(layer: AgentAttention, x):
    """The layer's forward written out: qkv, agents as 2 x 2 block means (8 x 8 map, 4 x 4 agents), the biases
    indexed per (head, agent, row, column), both softmaxes materialised, the depthwise conv of V, proj."""
    b, h, w, c = x.shape
    heads, d = layer.num_heads, c // layer.num_heads
    qkv = x @ layer.qkv.kernel[...] + layer.qkv.bias[...]
    q, k, v = (qkv[..., i * c:(i + 1) * c] for i in range(3))
    agents = q.reshape(b, 4, 2, 4, 2, c).mean(axis=(2, 4)).reshape(b, 16, heads, d)
    key_table = jax.image.resize(layer.agent_key_table[...], (heads, 16, h, w), "bilinear", antialias=False)
    query_table = jax.image.resize(layer.query_agent_table[...], (heads, 16, h, w), "bilinear", antialias=False)
    key_bias = key_table + layer.agent_row[...] + layer.agent_col[...]  # [N, n, H, W]
    query_bias = (jnp.moveaxis(query_table, 1, -1) + layer.row_agent[...] + layer.col_agent[...])  # [N, H, W, n]
    per_head = lambda t: t.reshape(b, h * w, heads, d)  # noqa: E731
    gather = jax.nn.softmax(jnp.einsum("band,bsnd->bnas", agents, per_head(k)) * d ** -0.5
                            + key_bias.reshape(heads, 16, h * w), axis=-1)
    agent_values = jnp.einsum("bnas,bsnd->band", gather, per_head(v))
    spread = jax.nn.softmax(jnp.einsum("btnd,band->bnta", per_head(q), agents) * d ** -0.5
                            + query_bias.reshape(heads, h * w, 16), axis=-1)
    out = jnp.einsum("bnta,band->btnd", spread, agent_values).reshape(b, h, w, c)
    conv = jax.lax.conv_general_dilated(v, layer.dwc.kernel[...], (1, 1), "SAME", feature_group_count=c,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer.dwc.bias[...]
    return (out + conv) @ layer.proj.kernel[...] + layer.proj.bias[...]


@pytest.fixture(scope="module")
def layer():
    return abstract_model(lambda: AgentAttention(8, 2, (8, 8), agent_grid=4, rngs=nnx.Rngs(0)), seed=1)


def test_layer_matches_the_dense_formula(layer):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 8), dtype=np.float32))
    got, want = nnx.jit(lambda m, x: (m(x), _dense_layer(m, x)))(layer, x)
    assert got.shape == (2, 8, 8, 8)
    assert_allclose(got, want)


def test_pooling_and_bias_resizing_match_torch():
    """Adaptive average pooling (overlapping bins on odd maps) and bilinear resizing, up and down."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for h, w, grid in ((7, 9, 3), (5, 5, 7)):
        x = rng.standard_normal((2, h, w, 6), dtype=np.float32)
        want = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x).permute(0, 3, 1, 2), grid)
        assert_allclose(pool_agents(jnp.asarray(x), grid), want.flatten(2).transpose(1, 2).numpy())
    table = rng.standard_normal((2, 3, 7, 7), dtype=np.float32)
    for size in ((14, 14), (5, 3), (9, 20)):
        want = torch.nn.functional.interpolate(torch.tensor(table), size=size, mode="bilinear").numpy()
        assert_allclose(resize_table(jnp.asarray(table), size), want)


def _count(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_parameter_counts():
    """qkv, proj, the depthwise conv (with bias) and the agent biases: two 7 x 7 tables and the row/column biases
    of both directions per head and agent."""
    dim, heads, (h, w), grid = 48, 3, (7, 9), 5
    layer = nnx.eval_shape(lambda: AgentAttention(dim, heads, (h, w), agent_grid=grid, rngs=nnx.Rngs(0)))
    agents = grid * grid
    assert _count(layer) == (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (9 * dim + dim) + heads * agents * (
        2 * 49 + 2 * (h + w))
    no_qkv_bias = nnx.eval_shape(lambda: AgentAttention(dim, heads, (h, w), qkv_bias=False, rngs=nnx.Rngs(0)))
    assert _count(layer) - _count(no_qkv_bias) == 3 * dim + heads * (agents - 49) * (2 * 49 + 2 * (h + w))
    assert _count(nnx.eval_shape(lambda: models.create_model("agent_vit_pico"))) == 181_928  # its docstring
    assert models.get_entry("agent_vit_pico").kind == "vision"


@pytest.fixture(scope="module")
def pico():
    return abstract_model(lambda: models.create_model("agent_vit_pico", num_classes=4, drop_path_rate=0.1))


@pytest.fixture(scope="module")
def one_block_pico():
    return abstract_model(lambda: models.create_model("agent_vit_pico", num_classes=4, depth=1, drop_path_rate=0.1))


def test_bad_inputs_raise_value_errors(layer, pico):
    with pytest.raises(ValueError, match=r"`x` must be \[B, H, W, C\] = \[B, 8, 8, 8\]"):
        layer(jnp.zeros((1, 8, 7, 8)))
    with pytest.raises(ValueError, match="`dim` \\(10\\) must be a multiple of `num_heads` \\(4\\)"):
        nnx.eval_shape(lambda: AgentAttention(10, 4, (8, 8), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="`images` must be NHWC"):
        pico(jnp.zeros((1, 16, 16, 3)))


def test_drop_in_for_the_attention_of_a_dinat_block():
    """`AgentAttention` takes and returns `[B, H, W, C]` maps like DiNAT's neighborhood attention: swapped in, the
    block traces (shapes only, nothing compiled)."""
    block = nnx.eval_shape(lambda: NATLayer(8, 2, 3, 1, mlp_ratio=2.0, rngs=nnx.Rngs(0)))
    block.attn = nnx.eval_shape(lambda: AgentAttention(8, 2, (6, 5), agent_grid=2, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m, x: m(x), block, jax.ShapeDtypeStruct((1, 6, 5, 8), jnp.float32))
    assert out.shape == (1, 6, 5, 8)


def test_pico_is_a_backbone(pico):
    """One feature per block at the patch stride; features_only prunes the head (shapes traced, nothing compiled)."""
    assert pico.feature_info.reduction() == [4, 4] and pico.feature_info.channels() == [64, 64]
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    features = nnx.eval_shape(lambda m, x: m.forward_intermediates(x), pico, x)
    assert [f.shape for f in features] == [(2, 8, 8, 64)] * 2
    backbone = nnx.eval_shape(lambda: models.create_model("agent_vit_pico", features_only=True, out_indices=(0,)))
    assert backbone.feature_info.module_name() == ["blocks.0"]


def test_pico_trains(one_block_pico):
    """Train mode (stochastic depth on): every parameter gets a finite gradient, and eight Adam steps on a fixed
    batch lower the loss (`agent_vit_pico` with one block, to compile one)."""
    pico = one_block_pico
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.standard_normal((8, 32, 32, 3), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, 4, 8))
    pico.train()
    optimizer = nnx.Optimizer(pico, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]

    losses = []
    for _ in range(8):
        loss, finite = step(pico, optimizer)
        losses.append(float(loss))
    assert len(finite) == len(jax.tree.leaves(nnx.state(pico, nnx.Param))) and all(map(bool, finite))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
