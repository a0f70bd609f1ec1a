"""HaloNet: timm fixture parity (logits and stage features), exact/paper parameter counts, pico forward/backward,
train vs eval, config rules, image-size and state-dict errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import feature_checks
from jaxattn import models
from jaxattn.models import convert
from jaxattn.models.halonet import AttnCfg, BlockCfg, HaloNet, interleave, make_divisible, stage
from jaxattn.models.halonet.conv import conv2d, max_pool_3x3_s2
from jaxattn.models.layers.tracing import count_params, eval_shape_model, fast_tracing
from jaxattn.testing import assert_matches_reference, random_inputs
from jaxattn.testing import model_checks
from jaxattn.testing.fixtures import load_model_fixture
from jaxattn.testing.model_init import abstract_model

# The fixtures' `__config__` (timm ByobNet terms) expressed as constructor overrides of the registered models.
FIXTURES = {
    # "self_attn d=(1,1,2,1) c=(32,32,64,64) s=(1,2,2,2) br=1.0", 7x7 stem 16 + maxpool, b 8, h 3, 2 heads
    "halonet_h1_reduced_timm": ("halonet_h1", dict(
        stages=[stage("self_attn", d, c, s) for d, c, s in zip((1, 1, 2, 1), (32, 32, 64, 64), (1, 2, 2, 2))],
        stem_chs=16, attn=AttnCfg(block_size=8, halo_size=3, num_heads=2))),
    # "bottle d=1 c=64 s=1; bottle d=1 c=64 s=2; interleave(bottle,self_attn) d=2 c=128 s=2; self_attn d=1 c=128
    # s=2; br=0.25", tiered stem 16 + maxpool, b 8, h 2, 2 heads
    "halonet26t_reduced_timm": ("halonet26t", dict(
        stages=[stage("bottle", 1, 64, 1, 0.25), stage("bottle", 1, 64, 2, 0.25),
                interleave(("bottle", "self_attn"), 2, 128, 2, 0.25), stage("self_attn", 1, 128, 2, 0.25)],
        stem_chs=16, attn=AttnCfg(block_size=8, halo_size=2, num_heads=2))),
}


def _fixture(name):
    fixture = load_model_fixture(name)
    if fixture is None:
        pytest.skip(f"fixture {name}.npz not found (expected in <repo>/../shared/fixtures or $JAXATTN_FIXTURES)")
    return fixture


def _zeros_model(name, **overrides):
    """A registered model ready for a strict load (built abstractly, no random init)."""
    with fast_tracing():
        return abstract_model(lambda: models.create_model(name, **overrides), fill="zeros")


def _param_count(name, **overrides):
    return count_params(eval_shape_model(lambda: models.create_model(name, **overrides)))


@functools.cache
def _reduced(fixture_name):
    """The reduced timm model loaded from the fixture, and its logits and stage features (one compile)."""
    def build(config):
        assert config["num_classes"] == 10 and config["img_size"] == 256
        model_name, overrides = FIXTURES[fixture_name]
        return _zeros_model(model_name, num_classes=10, img_size=256, **overrides)
    return feature_checks.loaded_fixture(fixture_name, build, convert.load_timm)


@pytest.mark.parametrize("fixture_name", sorted(FIXTURES))
def test_timm_fixture_parity(fixture_name):
    fixture, _, outputs = _reduced(fixture_name)
    model_checks.assert_fixture_logits(outputs["logits"], fixture)


@pytest.mark.parametrize("fixture_name", sorted(FIXTURES))
def test_stage_features_match_timm(fixture_name):
    """timm's `forward_intermediates` list (stem conv first, `final_conv` last), values and `feature_info`."""
    _, model, outputs = _reduced(fixture_name)
    feature_checks.assert_features_match_reference(model, outputs, fixture_name, final="final")


def test_from_timm_builds_and_loads_reduced_checkpoint():
    fixture = _fixture("halonet_h1_reduced_timm")
    model = convert.from_timm("halonet_h1", fixture.state_dict, **FIXTURES["halonet_h1_reduced_timm"][1])
    assert model.fc.out_features == 10  # inferred from head.fc
    # stage 2's second block: the scanned stack's only cycle (index 0 of the stacked kernel)
    np.testing.assert_array_equal(np.asarray(model.stages[2].repeat.blocks.blocks[0].self_attn.kv.kernel[...])[0, 0, 0],
                                  fixture.state_dict["stages.2.1.self_attn.kv.weight"][:, :, 0, 0].T)
    assert {"halonet26t", "halonet50ts", "halonet_h1"} <= set(convert.checkpoint_names("timm"))


def test_loader_is_strict():
    fixture = _fixture("halonet26t_reduced_timm")
    model_name, overrides = FIXTURES["halonet26t_reduced_timm"]
    model = _zeros_model(model_name, num_classes=10, **overrides)
    missing = {k: v for k, v in fixture.state_dict.items() if k != "stages.2.1.self_attn.kv.weight"}
    with pytest.raises(convert.StateDictError, match="stages.2.1.self_attn.kv.weight"):
        convert.load_timm(model, missing)
    extra = {**fixture.state_dict, "stages.9.0.conv1_1x1.conv.weight": np.zeros((1,))}
    with pytest.raises(convert.StateDictError, match="stages.9.0"):
        convert.load_timm(model, extra)
    bad = {**fixture.state_dict, "stages.3.0.self_attn.pos_embed.height_rel": np.zeros((21, 16), np.float32)}
    with pytest.raises(convert.StateDictError, match="height_rel"):
        convert.load_timm(model, bad)


@pytest.mark.parametrize("name,count", [
    ("halonet_h1", 8_100_056), ("halonet26t", 12_480_288), ("halonet50ts", 22_733_280),
    ("sehalonet33ts", 13_691_712),
])
def test_exact_parameter_counts_and_timm_feature_info(name, count):
    model = eval_shape_model(lambda: models.create_model(name))
    assert count_params(model) == count
    feature_checks.assert_feature_info_equals_timm(model, name)  # stems with and without pool, final conv


PAPER_PARAMS = {"halonet_h0": 5.5e6, "halonet_h1": 8.1e6, "halonet_h2": 9.4e6, "halonet_h3": 11.8e6,
                "halonet_h4": 19.1e6, "halonet_h5": 30.7e6, "halonet_h6": 43.4e6, "halonet_h7": 67.4e6}


def test_paper_variants_within_two_percent():
    for name, paper in PAPER_PARAMS.items():
        count = _param_count(name)
        assert abs(count / paper - 1) <= 0.02, (name, count, paper)


@pytest.fixture(scope="module")
def pico():
    """halonet_pico with random numpy weights (eager init costs one XLA compile per parameter shape; the real
    initialisers run in `test_from_timm_builds_and_loads_reduced_checkpoint`). BN scales are not zero (timm's
    zero-init of the last BN would give every residual branch zero gradients)."""
    model = eval_shape_model(lambda: models.create_model("halonet_pico", num_classes=7))
    rng = np.random.default_rng(0)

    def value(path, v):
        if isinstance(v, nnx.RngKey):
            return jax.random.key(len(path))
        if isinstance(v, nnx.RngCount):
            return np.zeros(v.shape, v.dtype)
        name = str(path[-1])
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
        fan_in = int(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 1
        return (rng.standard_normal(v.shape) * (0.1 if name in ("bias", "mean") else fan_in ** -0.5)).astype(v.dtype)

    state = nnx.state(model)
    nnx.update(model, nnx.map_state(lambda path, v: v.replace(value(path, v)), state))
    return model


def test_pico_gradient_under_jit_and_train_eval_differ(pico):
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    labels = jnp.array([1, 5])

    def step(state, images, labels):
        model = nnx.merge(graph, state)
        # eval-mode logits (what `model.eval()` selects) from the same compiled call, before the BN update
        eval_logits = nnx.view(model, deterministic=True, use_running_average=True)(images)

        def loss_fn(model):
            logits = model(images)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)), logits
        return nnx.value_and_grad(loss_fn, has_aux=True)(model), eval_logits, nnx.state(model)

    pico.train()
    mean_before = np.asarray(pico.stages[0].first.post_attn.mean[...])
    graph, state = nnx.split(pico)
    args = (state, images, labels)  # compiled without XLA's backend optimisations: compile time dominates
    ((loss, train_logits), grads), eval_logits, state = jax.jit(step).lower(*args).compile(
        feature_checks.FAST_COMPILE)(*args)
    nnx.update(pico, state)  # the batch statistics the step updated
    assert train_logits.shape == eval_logits.shape == (2, 7) and np.isfinite(float(loss))
    leaves = [np.asarray(g) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]  # no eager compile per shape
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    # every parameter gets a gradient (relative-position tables and both projections included)
    assert sum(float(np.abs(g).sum()) > 0 for g in leaves) == len(leaves)
    # training mode: batch statistics (running ones updated) and drop path; eval mode: running statistics
    assert np.all(np.isfinite(np.asarray(eval_logits)))
    assert not np.allclose(np.asarray(eval_logits), np.asarray(train_logits), atol=1e-5)
    assert not np.allclose(np.asarray(pico.stages[0].first.post_attn.mean[...]), mean_before)
    pico.eval()
    assert pico.stages[3].first.drop_path.deterministic and pico.stages[0].first.post_attn.use_running_average
    assert pico.head_drop.deterministic


def test_bad_image_size_raises_clear_error(pico):
    with pytest.raises(ValueError, match=r"img_size.*stages\.2\.1.*block size 8.*multiples of .*256"):
        models.create_model("halonet26t", img_size=224)
    with pytest.raises(ValueError, match=r"images.*\(48, 64\).*multiples of .*64"):
        pico(jnp.zeros((1, 48, 64, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        pico(jnp.zeros((64, 64, 3)))
    assert nnx.eval_shape(lambda: models.create_model("halonet_pico", img_size=(128, 64))).img_size == (128, 64)


def test_strided_variants_shapes():
    """Query-strided halo blocks, the average-pool fallback (odd block / avg_down) and widened values."""
    stages = [stage("self_attn", 1, 16, 1), stage("self_attn", 1, 32, 2, value_ratio=2.0)]
    for attn in (AttnCfg(4, 1, num_heads=2), AttnCfg(4, 1, num_heads=2, avg_down=True),
                 AttnCfg(3, 1, num_heads=2, qk_ratio=0.5)):
        model = nnx.eval_shape(lambda: HaloNet(stages, stem_chs=8, attn=attn, img_size=48 if attn.block_size == 3
                                               else 32, num_classes=3, rngs=nnx.Rngs(0)))
        size = 48 if attn.block_size == 3 else 32
        out = nnx.eval_shape(lambda m: m(jnp.zeros((1, size, size, 3))), model)
        assert out.shape == (1, 3)
        block = model.stages[1].first.self_attn
        assert block.avg_pool == (attn.avg_down or attn.block_size % 2 == 1)
        assert block.dim_head_v == 32 and block.dim_head_qk == (32 if attn.qk_ratio == 1 else 16)


def test_config_rules_match_timm():
    kinds = lambda blocks: [b.type[0] for b in blocks]  # noqa: E731
    pair = ("bottle", "self_attn")
    assert kinds(interleave(pair, 2, 8)) == ["b", "s"]
    assert kinds(interleave(pair, 6, 8)) == ["b", "s", "b", "s", "b", "s"]
    assert kinds(interleave(pair, 4, 8, every=4)) == ["b", "b", "b", "s"]
    assert kinds(interleave(pair, 3, 8, every=[2])) == ["b", "b", "s"]
    assert [b.stride for b in stage("bottle", 3, 8, 2)] == [2, 1, 1]
    assert make_divisible(64 * 0.25) == 16 and make_divisible(1536 * 0.333) == 512 and make_divisible(20) == 24
    with pytest.raises(ValueError, match="type"):
        BlockCfg("conv", 8)
    with pytest.raises(ValueError, match="value_ratio"):
        BlockCfg("bottle", 8, value_ratio=2.0)
    with pytest.raises(ValueError, match="num_heads"):
        nnx.eval_shape(lambda: HaloNet([stage("self_attn", 1, 16, 1)], attn=AttnCfg(num_heads=3), img_size=32,
                                       stem_chs=8, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("size,cin,kernel,stride,dtype", [
    ((9, 7), 5, 1, 2, jnp.bfloat16),  # matmul form
    ((9, 8), 3, 7, 2, jnp.float32),  # patches form (few input channels)
])
def test_conv2d_matches_lax_convolution(size, cin, kernel, stride, dtype):
    pad = ((stride - 1) + (kernel - 1)) // 2
    x, w = random_inputs(3, [(2, *size, cin), (kernel, kernel, cin, 4)])

    def reference(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert_matches_reference(lambda x, w: conv2d(x, w, stride=stride, padding=pad), reference, [x, w], dtype=dtype,
                             names=["x", "kernel"])


@pytest.mark.parametrize("size,dtype", [((9, 7), jnp.float32), ((1, 2), jnp.bfloat16)])
def test_max_pool_matches_reduce_window_including_ties(size, dtype):
    (x,) = random_inputs(4, [(2, *size, 3)])
    x = jax.nn.relu(x).at[0, 0, 0].set(0.5).at[0, 0, -1].set(0.5)  # ReLU zeros and an exact tie

    def reference(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                     ((0, 0), (1, 1), (1, 1), (0, 0)))

    assert_matches_reference(max_pool_3x3_s2, reference, [x], dtype=dtype, names=["x"])
