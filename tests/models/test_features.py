"""The vision models as backbones: timm's index rules, `features_only` models at two input sizes per family (shapes
from `feature_info`, traced without compiling), pruning and strict loading of pruned models, and the feature models'
context-parallel sharding on 8 host devices. Values against the reference code are tested per family
(`test_<family>.py::test_stage_features_*`), and `feature_info` against timm's beside the parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import feature_checks
from jaxattn import models
from jaxattn.models import convert
from jaxattn.models.features import Backbone, FeatureModel, FeatureSpec, take_indices
from jaxattn.testing.fixtures import load_model_fixture
from jaxattn.testing.model_init import abstract_model


# -- timm's index rules, on a stand-in backbone whose features are their own index ---------------------------------
class _Counting(Backbone):
    """Three features from three taps; tap `i` adds 1 to `x`, its feature is `x`; the final norm adds 100."""
    feature_specs = tuple(FeatureSpec(1, 2 ** (i + 1), f"stages.{i}", i) for i in range(3))
    norm_attr = ("norm", "norm.")

    def __init__(self):
        self.ran = []
        self.norm = lambda x: x + 100

    def check_images(self, x):
        pass

    def _taps(self):
        def tap(i):
            def run(x):
                self.ran.append(i)
                return x + 1, x + 1
            return run
        return [tap(i) for i in range(3)]


@pytest.mark.parametrize("indices,taken", [
    (None, [1, 2, 3]), (1, [3]), (2, [2, 3]), ([0], [1]), ([-1, 0], [1, 3]), ((2, 0, 2), [1, 3]),
])
def test_indices_follow_timm(indices, taken):
    """An int takes the last n; a sequence those indices (negative from the end); results in forward order."""
    out = _Counting().forward_intermediates(np.zeros(()), indices)
    assert [int(f) for f in out] == taken


@pytest.mark.parametrize("indices", [0, 4, [3], [-4], []])
def test_bad_indices(indices):
    with pytest.raises(ValueError, match="indices"):
        _Counting().forward_intermediates(np.zeros(()), indices)


def test_norm_stop_early_and_final():
    model = _Counting()
    assert [int(f) for f in model.forward_intermediates(np.zeros(()), [0, 2], norm=True)] == [1, 103]
    final, features = model.forward_intermediates(np.zeros(()), [0], stop_early=True, intermediates_only=False)
    assert model.ran == [0, 1, 2, 0] and int(final) == 1  # stopped early: no final norm
    final, _ = model.forward_intermediates(np.zeros(()), [0], intermediates_only=False)
    assert int(final) == 103
    assert take_indices(5, [-1, 1]) == ([4, 1], 4)


# -- features_only models: two input sizes per family ---------------------------------------------------------------
# name, two valid sizes (one not square), an invalid size and the constraint its error names (None: DiNAT takes
# any size, padding small maps up to the window)
SIZES = {
    "maxvit_pico": ([(64, 64), (128, 64)], (96, 96), "window_size"),
    "halonet_pico": ([(64, 64), (128, 192)], (96, 96), "block size"),
    "dinat_pico": ([(64, 64), (50, 70)], None, None),
    "biformer_pico": ([(64, 64), (96, 64)], (48, 48), "n_win"),
}


def _abstract(name, **kwargs):
    return nnx.eval_shape(lambda: models.create_model(name, features_only=True, rngs=nnx.Rngs(0), **kwargs))


def _shapes(model, h, w, batch=2):
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32))
    return [tuple(o.shape) for o in out]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_feature_model_sizes_follow_feature_info(name):
    sizes, bad, constraint = SIZES[name]
    model = _abstract(name)
    info = model.feature_info
    assert [f["index"] for f in info] == list(range(len(info))) and info.reduction() == sorted(info.reduction())
    for h, w in sizes:
        expected = [(2, -(-h // r), -(-w // r), c) for r, c in zip(info.reduction(), info.channels())]
        assert _shapes(model, h, w) == expected, (name, h, w)
    if bad is not None:
        with pytest.raises(ValueError, match=constraint):
            _shapes(model, *bad)
    with pytest.raises(ValueError, match="channels|rank"):
        nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 3, 64, 64), jnp.float32))


def test_out_indices_prune_and_nchw():
    full = nnx.eval_shape(lambda: models.create_model("biformer_pico", num_classes=0, rngs=nnx.Rngs(0)))
    model = _abstract("biformer_pico", out_indices=(0, -3), feature_cfg=dict(output_fmt="NCHW"))
    assert model.feature_info == [dict(num_chs=32, reduction=4, module="stages.0", index=0),
                                  dict(num_chs=64, reduction=8, module="stages.1", index=1)]
    assert len(model.model.stages) == 2 and model.model.norm is None and model.model.head is None
    assert model.model.pruned_prefixes == ("downsample_layers.2.", "stages.2.", "downsample_layers.3.",
                                           "stages.3.", "norm.", "head.")
    assert _shapes(model, 64, 96) == [(2, 32, 16, 24), (2, 64, 8, 12)]
    count = lambda m: sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(model) < count(full)
    normed = _abstract("dinat_pico", out_indices=1, feature_cfg=dict(norm=True))
    assert normed.model.norm is not None and normed.feature_info.module_name() == ["levels.3.blocks"]
    stem = _abstract("halonet_pico", out_indices=[0])  # only the stem's conv: its pool goes too
    assert stem.model.stem.pool is False and _shapes(stem, 64, 64) == [(2, 32, 32, 16)]


def test_halonet_exclude_final_conv():
    model = nnx.eval_shape(lambda: models.create_model("halonet_pico", num_features=48, rngs=nnx.Rngs(0)))
    assert model.feature_info[-1] == dict(num_chs=48, reduction=32, module="final_conv", index=4)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    run = lambda **kw: nnx.eval_shape(  # noqa: E731
        lambda m, x: m.forward_intermediates(x, [-1], intermediates_only=False, **kw), model, x)
    final, (last,) = run()
    assert final.shape == last.shape == (1, 2, 2, 48)
    final, (last,) = run(exclude_final_conv=True)
    assert last.shape == (1, 2, 2, 128) and final.shape == (1, 2, 2, 48)


def test_bad_feature_arguments():
    with pytest.raises(ValueError, match="features_only=True"):
        models.create_model("dinat_pico", out_indices=(1,))
    with pytest.raises(ValueError, match="language model"):
        models.create_model("softmax_lm_tiny", features_only=True)
    with pytest.raises(ValueError, match="feature_cfg"):
        _abstract("dinat_pico", feature_cfg=dict(flatten=True))
    with pytest.raises(ValueError, match="output_fmt"):
        _abstract("dinat_pico", feature_cfg=dict(output_fmt="NWHC"))
    with pytest.raises(ValueError, match="indices"):
        _abstract("dinat_pico", out_indices=(4,))


# -- loading pruned models --------------------------------------------------------------------------------------------
def _fixture(name):
    fixture = load_model_fixture(name)
    if fixture is None:
        pytest.skip(f"fixture {name}.npz not found (../shared/fixtures or $JAXATTN_FIXTURES)")
    return fixture


def _dinat_overrides(c):
    keys = ("embed_dim", "depths", "num_heads", "mlp_ratio", "kernel_size", "dilations", "img_size")
    return {k: c[k] for k in keys}


def test_feature_models_load_strictly_from_classifier_checkpoints(tmp_path):
    """A pruned backbone loads from the full model's checkpoint file: the keys of pruned layers are skipped, every
    other key is used and every variable set (the loaders are strict)."""
    fixture = _fixture("dinat_reduced_official")
    path = tmp_path / "dinat.npz"
    np.savez(path, **fixture.state_dict)
    for out_indices in ((0, 1), None):
        model = abstract_model(lambda o=out_indices: models.create_model(
            "dinat_mini", features_only=True, out_indices=o, **_dinat_overrides(fixture.config)), fill="zeros")
        convert.load_dinat(model, path)
        assert isinstance(model, FeatureModel)
        first = model.model.levels[1].segments[0]  # a scanned Stack: its first unit's first block
        np.testing.assert_array_equal(np.asarray(first.blocks.blocks[0].attn.rpb[...][0]),
                                      fixture.state_dict["levels.1.blocks.0.attn.rpb"])
    fixture = _fixture("biformer_reduced_official")
    wrong = {k: v for k, v in fixture.state_dict.items() if not k.startswith("stages.1.0.attn.qkv.qkv.bias")}
    model = abstract_model(lambda: models.create_model("biformer_pico", features_only=True, out_indices=2,
                                                       n_win=7, topks=(1, 4, 16, -2)), fill="zeros")
    with pytest.raises(convert.StateDictError, match="stages.1.0.attn.qkv.qkv.bias"):
        convert.load_biformer(model, wrong)


def test_timm_backbone_from_file_matches_timm(tmp_path):
    """A pruned halonet_h1 backbone loaded from a `.safetensors` file gives timm's features (`forward_intermediates`
    recorded from the reduced halonet_h1)."""
    from test_halonet import FIXTURES
    fixture = _fixture("halonet_h1_reduced_timm")
    path = tmp_path / "halonet_h1.safetensors"
    feature_checks.write_safetensors(path, fixture.state_dict)
    overrides = FIXTURES["halonet_h1_reduced_timm"][1]
    model = abstract_model(lambda: models.create_model("halonet_h1", features_only=True, out_indices=(0, -3),
                                                       **overrides), fill="zeros")
    convert.load_timm(model, path)
    assert model.feature_info.module_name() == ["stem.conv1", "stages.1"] and len(model.model.stages) == 2
    model.eval()
    features = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(fixture.images_nhwc[:1]))
    reference = feature_checks.recorded("halonet_h1_reduced_timm")
    for feature, key in zip(features, ("f0", "f2")):
        feature_checks.assert_close_to_recorded(key, feature[0], reference[key])


# -- context parallelism ----------------------------------------------------------------------------------------------
@pytest.mark.devices(8)
def test_feature_models_under_context_parallelism():
    """DiNAT and HaloNet backbones with `context_parallel='halo'` on a (data 2, context 4) mesh: the same features
    as on one device, and every feature whose rows split over the context axis comes back sharded by rows."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxattn.models.halonet import AttnCfg, stage
    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    builds = {  # 48 px: maps of 12 rows (sharded), then 6 (DiNAT: the single-device op; not split over 4)
        "dinat": lambda: models.create_model(
            "dinat_pico", features_only=True, context_parallel="halo", embed_dim=16, depths=(1, 1),
            num_heads=(2, 2), kernel_size=3, dilations=((1,), (1,)), img_size=48),
        "halonet": lambda: models.create_model(
            "halonet_pico", features_only=True, out_indices=(1, 2), context_parallel="halo", img_size=48,
            stem_chs=8, stages=[stage("self_attn", 1, c, 1 if i == 0 else 2) for i, c in enumerate((16, 24))],
            attn=AttnCfg(block_size=3, halo_size=1, num_heads=2)),
    }
    images = {"dinat": jax.random.normal(jax.random.key(0), (2, 48, 48, 3)),
              "halonet": jax.random.normal(jax.random.key(1), (2, 48, 48, 3))}
    def run(model, x):  # traced afresh each time: under the mesh the halo strategy runs
        graph, state = nnx.split(model)
        forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
        return forward.lower(state, x).compile(feature_checks.FAST_COMPILE)(state, x)

    for family, build in builds.items():
        model = abstract_model(build)
        model.eval()
        single = run(model, images[family])
        with jax.set_mesh(mesh):
            sharded = run(model, jax.device_put(images[family], NamedSharding(mesh, P("data", "context"))))
        for i, (a, b) in enumerate(zip(single, sharded)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5, err_msg=f"{family} {i}")
            spec = tuple(b.sharding.spec) + (None,) * 4
            assert (spec[1] == "context") == (b.shape[1] % 4 == 0), (family, i, b.shape, b.sharding.spec)
