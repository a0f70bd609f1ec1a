"""DiNAT: reference-fixture parity, exact parameter counts, the padding path of small maps, train/eval, loading."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict
from hypothesis import example, given, settings, strategies as st

import feature_checks

from jaxattn import models
from jaxattn.models import convert
from jaxattn.models.convert import StateDictError
from jaxattn.models.dinat import DiNAT, default_dilations, stacking
from jaxattn.models.dinat.model import NATLayer, NeighborhoodAttention2D
from jaxattn.models.layers.drop_path import DropRate
from jaxattn.models.layers.tracing import count_params, eval_shape_model
from jaxattn.testing import model_checks
from jaxattn.testing.model_init import abstract_model

EXACT_PARAMS = {"dinat_mini": 19_984_174, "dinat_tiny": 27_901_582, "dinat_small": 50_719_681,
                "dinat_base": 89_769_652, "dinat_large": 200_943_514}
PICO_SIZE = 64  # dilations 2, 1, 1, 1; stages 16, 8, 4, 2 px, so the last two are padded up to the window


def _forward(model, x):
    return model(x)


_jit_forward = feature_checks.jit_forward  # also runs single layers


def with_drop_rates(constructor):
    """`abstract_model(constructor)` with the scanned stacks' drop-path rates (`DropRate` variables, which the
    numpy fill zeroes) computed by the constructor itself: one small compile, the parameters' init eliminated."""
    model = abstract_model(constructor)
    nnx.update(model, jax.jit(lambda: nnx.state(constructor(), DropRate))())
    return model


@pytest.fixture(scope="module")
def pico():
    # Built abstractly and filled with numpy: eager init would compile one program per parameter shape.
    return with_drop_rates(lambda: models.create_model("dinat_pico", num_classes=5, img_size=PICO_SIZE))


def _images(seed, b, h, w, c=3):  # numpy: no eager random-number compile per shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, c)), jnp.float32)


# -- the reference fixture ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reduced():
    """The reduced reference model loaded from the fixture, and its logits and stage features (one compile)."""
    keys = ("num_classes", "embed_dim", "depths", "num_heads", "mlp_ratio", "kernel_size", "dilations", "img_size",
            "drop_path_rate")
    build = lambda c: abstract_model(lambda: models.create_model(  # noqa: E731
        "dinat_mini", **{k: c[k] for k in keys}), fill="zeros")
    return feature_checks.loaded_fixture("dinat_reduced_official", build, convert.load_dinat)


def test_fixture_parity(reduced):
    fx, _, outputs = reduced
    model_checks.assert_fixture_logits(outputs["logits"], fx)


def test_stage_features_match_official_backbone(reduced):
    """Each level's output before its downsampler, as the official detection backbone taps it (norm{i} aside)."""
    _, model, outputs = reduced
    feature_checks.assert_features_match_reference(model, outputs, "dinat_reduced_official", final="normed_last")


# -- configuration --------------------------------------------------------------------------------------------------
def test_exact_parameter_counts():
    for name, expected in EXACT_PARAMS.items():
        abstract = eval_shape_model(lambda name=name: models.create_model(name, rngs=nnx.Rngs(0)))
        assert count_params(abstract) == expected, name
    assert set(EXACT_PARAMS) | {"dinat_pico"} == set(models.list_models(family="dinat"))


def test_dilations_follow_resolution_as_the_official_configs():
    k7_224 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    assert default_dilations(224, (3, 4, 18, 5), 7) == k7_224
    assert default_dilations(224, (3, 4, 6, 5), 7) == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]
    assert default_dilations(384, (3, 4, 18, 5), 7) == [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]
    assert default_dilations(384, (3, 4, 18, 5), 11) == k7_224  # dinat_large_384_11x11
    names = convert.checkpoint_names("dinat")
    for name in ("dinat_mini_in1k_224", "dinat_base_in1k_224", "dinat_large_in22k_in1k_384",
                 "dinat_large_in22k_in1k_384_11x11", "dinat_large_in22k_224_11x11interp"):
        assert name in names


# -- the attention layer, including maps smaller than the window --------------------------------------------------
def _axis_window(length, k, d):
    """Dense `[L, L]` mask and rpb index along one axis, written from NATTEN 0.14's rule (ops.md)."""
    mask = np.zeros((length, length), bool)
    rel = np.zeros((length, length), np.int64)
    for i in range(length):
        lg = len(range(i % d, length, d))
        start = min(max(i // d - k // 2, 0), lg - k)
        for m in range(i % d, length, d):
            mask[i, m] = start <= m // d < start + k
            rel[i, m] = min(max(m // d - i // d + k - 1, 0), 2 * k - 2)  # clipped where masked anyway
    return mask, rel


def _attention_layer_numpy(layer, x):
    """The natten 0.14 layer in float64: zero-pad right/bottom to `k * d`, qkv, scaled q, + rpb, softmax, crop."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    k, d, n = layer.kernel_size, layer.dilation, layer.num_heads
    hp, wp = max(h, k * d), max(w, k * d)
    x = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    param = lambda v: np.asarray(v[...], np.float64)
    qkv = (x @ param(layer.qkv.kernel).reshape(c, 3 * c) + param(layer.qkv.bias).reshape(-1)).reshape(
        b, hp, wp, 3, n, c // n)
    q, kk, v = qkv[..., 0, :, :] * layer.scale, qkv[..., 1, :, :], qkv[..., 2, :, :]
    mh, rh = _axis_window(hp, k, d)
    mw, rw = _axis_window(wp, k, d)
    mask = mh[:, None, :, None] & mw[None, :, None, :]  # [qy, qx, ky, kx]
    bias = param(layer.rpb)[:, rh[:, None, :, None], rw[None, :, None, :]]  # [n, qy, qx, ky, kx]
    logits = np.einsum("bijnc,bklnc->bnijkl", q, kk) + bias[None]
    logits = np.where(mask[None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(axis=(-2, -1), keepdims=True))
    p /= p.sum(axis=(-2, -1), keepdims=True)
    out = np.einsum("bnijkl,bklnc->bijnc", p, v)[:, :h, :w].reshape(b, h, w, c)
    return out @ param(layer.proj.kernel).reshape(c, c) + param(layer.proj.bias)


@settings(max_examples=2)
@given(h=st.integers(1, 11), w=st.integers(1, 11), k=st.sampled_from([3, 5]), d=st.integers(1, 3),
       heads=st.sampled_from([1, 2]))
@example(h=2, w=3, k=5, d=1, heads=2)  # both axes padded
@example(h=3, w=9, k=3, d=2, heads=2)  # only the height padded (window 6), dilated
def test_attention_layer_matches_dense_numpy(h, w, k, d, heads):
    """Includes maps smaller than the window: they are zero-padded before qkv, so padded keys carry the bias."""
    layer = abstract_model(lambda: NeighborhoodAttention2D(4 * heads, heads, k, d, rngs=nnx.Rngs(0)),
                           seed=h * 31 + w)
    layer.qkv.bias[...] = np.random.default_rng(d).standard_normal(layer.qkv.bias.shape, np.float32)
    x = _images(h + w, 1, h, w, 4 * heads)
    np.testing.assert_allclose(np.asarray(_jit_forward(layer, x)), _attention_layer_numpy(layer, x), atol=2e-5,
                               rtol=0)


def test_layer_scale_zero_makes_a_block_the_identity():
    block = abstract_model(lambda: NATLayer(8, 2, 3, 1, mlp_ratio=2.0, layer_scale=0.0, rngs=nnx.Rngs(0)))
    block.gamma1[...], block.gamma2[...] = np.zeros(8, np.float32), np.zeros(8, np.float32)
    x = _images(0, 1, 5, 6, 8)
    np.testing.assert_array_equal(np.asarray(_jit_forward(block, x)), np.asarray(x))
    assert block.gamma1 is not None and block.gamma2 is not None


# -- the whole model ------------------------------------------------------------------------------------------------
def test_pico_train_step_finite_and_train_eval_differ(pico):
    x = _images(0, 2, PICO_SIZE, PICO_SIZE)
    labels = jnp.array([1, 3])
    _, train_logits, grads = model_checks.train_step_gradients(pico, x, labels)
    assert float(jnp.abs(grads["levels"][0]["segments"][0]["blocks"]["blocks"][0]["attn"]["rpb"][...]).sum()) > 0
    model_checks.assert_eval_differs_from_train(pico, x, train_logits, _jit_forward)  # stochastic depth


def test_small_odd_input_runs_through_the_padding_path(pico):
    """44 x 20 px: stage maps 11x5, 6x3, 3x2, 2x1, each smaller than its window (14 in stage 0, then 7)."""
    pico.eval()
    out = _jit_forward(pico, _images(2, 2, 44, 20))
    assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))


def test_bfloat16_compute_tracks_float32(pico):
    pico.eval()
    low = abstract_model(lambda: models.create_model("dinat_pico", num_classes=5, img_size=PICO_SIZE,
                                                     dtype=jnp.bfloat16))
    nnx.update(low, nnx.state(pico, nnx.Param))
    low.eval()
    x = _images(0, 2, PICO_SIZE, PICO_SIZE)  # the shape compiled above
    ref, out = np.asarray(_jit_forward(pico, x)), np.asarray(_jit_forward(low, x), np.float32)
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= 0.05 * np.abs(ref).max() + 0.05


# -- loading and bad inputs -----------------------------------------------------------------------------------------
def _state_dict_of(model):
    """Our parameters in the reference's names and layouts (any layout: via the per-block names), for round trips."""
    out = {}
    per_block = stacking.to_per_block(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model)
    for path, value in flatten_dict(per_block).items():
        parts = [str(p) for p in path]
        value = np.asarray(value)
        leaf, owner = parts[-1], parts[:-1]
        owner = [{"proj0": "proj.0", "proj1": "proj.1"}.get(p, p) for p in owner]
        if owner[-2:] == ["attn", "qkv"]:  # [C, 3, heads, head_dim] and [3, heads, head_dim]
            value = value.reshape(value.shape[0], -1) if leaf == "kernel" else value.reshape(-1)
        if owner[-2:] == ["attn", "proj"] and leaf == "kernel":  # [heads, head_dim, C]
            value = value.reshape(-1, value.shape[-1])
        if leaf == "kernel":
            leaf, value = "weight", (value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1))
        elif leaf == "scale":
            leaf = "weight"
        out[".".join(owner + [leaf])] = value
    return out


def test_from_dinat_round_trip_with_layer_scale_and_strict_errors():
    # DiNAT-Base's layer scale on a one-stage model: from_dinat builds it eagerly, so keep its shapes few.
    arch = dict(embed_dim=8, depths=(2,), num_heads=(2,), kernel_size=3, mlp_ratio=2.0, img_size=16)
    src = abstract_model(lambda: models.create_model("dinat_base", num_classes=3, **arch), seed=3)
    sd = _state_dict_of(src)
    assert {"levels.0.blocks.1.gamma2", "levels.0.blocks.0.attn.rpb", "patch_embed.proj.1.weight"} <= set(sd)
    dst = convert.from_dinat("dinat_base_in1k_224", sd, **arch)
    assert dst.head.out_features == 3  # read from head.weight
    want, got = nnx.state(src, nnx.Param), nnx.state(dst, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got)

    with pytest.raises(StateDictError, match="levels.0.blocks.0.gamma1"):
        convert.load_dinat(dst, {k: v for k, v in sd.items() if k != "levels.0.blocks.0.gamma1"})
    with pytest.raises(StateDictError, match="not used.*extra.weight"):
        convert.load_dinat(dst, {**sd, "extra.weight": np.zeros(3)})
    with pytest.raises(StateDictError, match="attn.rpb"):
        convert.load_dinat(dst, {**sd, "levels.0.blocks.0.attn.rpb": np.zeros((2, 7, 7), np.float32)})
    with pytest.raises(ValueError, match="unknown dinat checkpoint"):
        convert.from_dinat("dinat_huge_in1k_224", sd)


def test_a_state_dict_fills_the_unrolled_layout_as_the_scanned_one():
    """The default (scanned) model's reference state dict loads into `scan_blocks=False` (per-unit modules), and
    both give the same per-block parameters; the stage is a scanned pair (dilations 1, 2) and a remainder block."""
    arch = dict(embed_dim=8, depths=(3,), num_heads=(2,), kernel_size=3, mlp_ratio=2.0, img_size=16,
                dilations=[[1, 2, 1]], num_classes=3)
    src = abstract_model(lambda: models.create_model("dinat_mini", **arch), seed=2)
    unrolled = abstract_model(lambda: models.create_model("dinat_mini", scan_blocks=False, **arch), fill="zeros")
    sd = _state_dict_of(src)
    convert.load_dinat(unrolled, sd)
    per_block = lambda m: stacking.to_per_block(nnx.to_pure_dict(nnx.state(m, nnx.Param)), m)  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, per_block(unrolled), per_block(src))
    assert _state_dict_of(unrolled).keys() == sd.keys()
    with pytest.raises(StateDictError, match="levels.0.blocks.2.mlp.fc1.weight"):
        convert.load_dinat(unrolled, {k: v for k, v in sd.items() if k != "levels.0.blocks.2.mlp.fc1.weight"})


def test_from_dinat_builds_a_backbone_from_a_file(tmp_path):
    """`from_dinat(name, path, features_only=True, out_indices=...)` builds the registered model as a backbone and
    fills it (strictly) from a classifier's `.safetensors` file. Traced abstractly: nothing is initialised or
    compiled, the key matching and shape checks run all the same."""
    arch = dict(embed_dim=8, depths=(1, 1), num_heads=(2, 2), kernel_size=3, mlp_ratio=2.0, img_size=16)
    src = abstract_model(lambda: models.create_model("dinat_mini", num_classes=3, **arch), seed=1)
    path = tmp_path / "dinat.safetensors"
    feature_checks.write_safetensors(path, _state_dict_of(src))
    model = nnx.eval_shape(lambda: convert.from_dinat("dinat_mini_in1k_224", str(path), features_only=True,
                                                      out_indices=[0], **arch))
    assert model.feature_info == [dict(num_chs=8, reduction=4, module="levels.0.blocks", index=0)]
    assert len(model.model.levels) == 1 and model.model.levels[0].downsample is None
    assert model.model.norm is None and model.model.head is None
    feature_checks.write_safetensors(path, {k: v for k, v in _state_dict_of(src).items() if "rpb" not in k})
    with pytest.raises(StateDictError, match="levels.0.blocks.0.attn.rpb"):
        nnx.eval_shape(lambda: convert.from_dinat("dinat_mini_in1k_224", path, features_only=True, **arch))


def test_bad_inputs_raise_value_errors(pico):
    with pytest.raises(ValueError, match="`x` must have rank 4"):
        pico(jnp.zeros((3, 32, 32)))
    with pytest.raises(ValueError, match="`x` channels"):
        pico(jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="floating"):
        pico(jnp.zeros((1, 32, 32, 3), jnp.int32))
    bad = [dict(dilations=[[1], [1], [1, 2]]), dict(dilations=[[1], [1], [1, 0], [1]]), dict(kernel_size=6),
           dict(num_heads=(3, 2, 4, 8)), dict(depths=(1, 1, 2)), dict(embed_dim=1)]
    for overrides in bad:
        with pytest.raises(ValueError, match=next(iter(overrides))):
            DiNAT(**{"embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8), **overrides},
                  rngs=nnx.Rngs(0))
