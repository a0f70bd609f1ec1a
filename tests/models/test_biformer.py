"""BiFormer: reference-fixture parity, exact parameter counts, BRA (with auto_pad) against a numpy port of the
reference layer, train/eval (BatchNorm, momentum convention), loading, bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings, strategies as st

import feature_checks

from jaxattn import models
from jaxattn.models import convert
from jaxattn.models.biformer import BiFormer
from jaxattn.models.biformer import convert as biformer_convert
from jaxattn.models.biformer.layers import per_head_qkv_fused
from jaxattn.models.biformer.model import BiLevelRoutingAttention
from jaxattn.models.convert import StateDictError
from jaxattn.models.layers.tracing import count_params, eval_shape_model
from jaxattn.testing import model_checks
from jaxattn.testing.fixtures import load_model_fixture
from jaxattn.testing.model_init import abstract_model

EXACT_PARAMS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}
PICO_SIZE = 64  # stage maps 16, 8, 4, 2: multiples of pico's n_win 2


def _forward(model, x):
    return model(x)


_jit_forward = feature_checks.jit_forward  # also runs single layers


def _images(seed, b, h, w, c=3):  # numpy: no eager random-number compile per shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, c)), jnp.float32)


@pytest.fixture(scope="module")
def pico():
    # Built abstractly and filled with numpy: eager init would compile one program per parameter shape.
    return abstract_model(lambda: models.create_model("biformer_pico", num_classes=5, img_size=PICO_SIZE))


def _abstract_zeros(name, **overrides):
    """A registered model ready to load a state dict into (no random init)."""
    return abstract_model(lambda: models.create_model(name, **overrides), fill="zeros")


# -- the reference fixture and configuration ------------------------------------------------------------------------
def _reduced_model(c):
    assert c["kv_downsample_mode"] == "identity" and c["pre_norm"] and c["layer_scale_init_value"] < 0
    return _abstract_zeros("biformer_tiny", num_classes=c["num_classes"], depths=c["depth"],
                           embed_dims=c["embed_dim"], mlp_ratios=c["mlp_ratios"], n_win=c["n_win"],
                           topks=c["topks"], qk_dims=c["qk_dims"], head_dim=c["head_dim"],
                           side_dwconv=c["side_dwconv"], before_attn_dwconv=c["before_attn_dwconv"],
                           img_size=c["img_size"])


@pytest.fixture(scope="module")
def reduced():
    """The reduced reference model loaded from the fixture, and its logits and stage features (one compile)."""
    return feature_checks.loaded_fixture("biformer_reduced_official", _reduced_model, convert.load_biformer)


def test_fixture_parity(reduced):
    fx, _, outputs = reduced
    model_checks.assert_fixture_logits(outputs["logits"], fx)


def test_stage_features_match_official(reduced):
    _, model, outputs = reduced
    feature_checks.assert_features_match_reference(model, outputs, "biformer_reduced_official", final="normed_last")


def test_exact_parameter_counts():
    for name, expected in EXACT_PARAMS.items():
        abstract = eval_shape_model(lambda name=name: models.create_model(name, rngs=nnx.Rngs(0)))
        count = count_params(abstract)
        assert count == expected, name
    assert set(EXACT_PARAMS) | {"biformer_pico"} == set(models.list_models(family="biformer"))
    assert {"biformer_tiny_in1k", "biformer_small_in1k", "biformer_base_in1k"} <= set(
        convert.checkpoint_names("biformer"))


# -- BRA against a numpy port of the reference layer ----------------------------------------------------------------
def _depthwise_numpy(x, kernel, bias):
    kh = kernel.shape[0]
    p = kh // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = x.shape[1:3]
    out = sum(xp[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(kh) for j in range(kh))
    return out + bias


def _bra_numpy(layer, x):
    """ops/bra_legacy.py in float64: (auto_pad), qkv, region means, top-k routing, per-head softmax over the
    routed regions' tokens, + LCE(v), wo, crop."""
    param = lambda v: np.asarray(v[...], np.float64)
    x = np.asarray(x, np.float64)
    b, h, w, _ = x.shape
    s, n, qk, dim = layer.n_win, layer.num_heads, layer.qk_dim, layer.dim
    x = np.pad(x, ((0, 0), (0, -h % s), (0, -w % s), (0, 0)))
    hp, wp = x.shape[1:3]
    rh, rw = hp // s, wp // s
    qkv = (x @ per_head_qkv_fused(param(layer.qkv.kernel), qk)
           + per_head_qkv_fused(param(layer.qkv.bias), qk))  # the reference's fused [q | k | v] Linear
    q, k, v = qkv[..., :qk], qkv[..., qk:2 * qk], qkv[..., 2 * qk:]
    regions = lambda t: t.reshape(b, s, rh, s, rw, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, s * s, rh * rw, -1)
    q_tok, k_tok, v_tok = regions(q), regions(k), regions(v)
    affinity = (q_tok.mean(2) * layer.scale) @ k_tok.mean(2).transpose(0, 2, 1)
    chosen = np.argsort(-affinity, axis=-1, kind="stable")[..., :layer.topk]
    out = np.zeros((b, s * s, rh * rw, dim))
    for bi in range(b):
        for r in range(s * s):
            keys = np.concatenate([k_tok[bi, c] for c in chosen[bi, r]])
            vals = np.concatenate([v_tok[bi, c] for c in chosen[bi, r]])
            for head in range(n):
                qs, vs = slice(head * qk // n, (head + 1) * qk // n), slice(head * dim // n, (head + 1) * dim // n)
                logits = layer.scale * q_tok[bi, r][:, qs] @ keys[:, qs].T
                p = np.exp(logits - logits.max(-1, keepdims=True))
                out[bi, r, :, vs] = (p / p.sum(-1, keepdims=True)) @ vals[:, vs]
    out = out.reshape(b, s, s, rh, rw, dim).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, dim)
    out = out + _depthwise_numpy(v, param(layer.lepe.kernel), param(layer.lepe.bias))
    return (out @ param(layer.wo.kernel).reshape(dim, dim) + param(layer.wo.bias))[:, :h, :w]


@settings(max_examples=2)
@given(h=st.integers(1, 9), w=st.integers(1, 9), n_win=st.integers(1, 3), topk_frac=st.floats(0, 1),
       heads=st.sampled_from([1, 2]))
@example(h=6, w=4, n_win=2, topk_frac=0.5, heads=2)  # divisible, no padding
@example(h=5, w=7, n_win=3, topk_frac=0.4, heads=2)  # padded to 6 x 9
def test_bra_layer_matches_numpy_port(h, w, n_win, topk_frac, heads):
    topk = max(1, round(topk_frac * n_win * n_win))
    layer = abstract_model(lambda: BiLevelRoutingAttention(8 * heads, heads, n_win, topk, qk_dim=4 * heads,
                                                           side_dwconv=3, auto_pad=True, rngs=nnx.Rngs(0)),
                           seed=h * 17 + w)
    # padded tokens carry the bias
    layer.qkv.bias[...] = np.random.default_rng(7).standard_normal(layer.qkv.bias.shape, np.float32)
    x = _images(h + w, 2, h, w, 8 * heads)
    np.testing.assert_allclose(np.asarray(_jit_forward(layer, x)), _bra_numpy(layer, x), atol=2e-5, rtol=0)


# -- the whole model ------------------------------------------------------------------------------------------------
def test_pico_train_step_batch_norm_and_train_eval(pico):
    x = _images(0, 2, PICO_SIZE, PICO_SIZE)
    labels = jnp.array([1, 3])
    bn = pico.downsample_layers[0].bn1
    old_mean = np.asarray(bn.mean[...])
    batch_mean = np.asarray(pico.downsample_layers[0].conv1(x).mean(axis=(0, 1, 2)))
    _, train_logits, _ = model_checks.train_step_gradients(pico, x, labels)
    # torch BatchNorm momentum 0.1: running = 0.9 * running + 0.1 * batch
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.9 * old_mean + 0.1 * batch_mean, atol=1e-5, rtol=1e-5)
    model_checks.assert_eval_differs_from_train(pico, x, train_logits, _jit_forward)  # batch statistics


def test_sizes_off_the_region_grid(pico):
    pico.eval()
    with pytest.raises(ValueError, match="n_win"):
        _forward(pico, _images(1, 1, 48, 48))  # stage-0 map 12 is even, stage-2 map 3 is not
    with pytest.raises(ValueError, match="img_size"):
        models.create_model("biformer_tiny", img_size=256, rngs=nnx.Rngs(0))
    padded = abstract_model(lambda: models.create_model("biformer_pico", num_classes=5, img_size=48, auto_pad=True))
    nnx.update(padded, nnx.state(pico))
    padded.eval()
    out = _jit_forward(padded, _images(1, 2, 48, 40))
    assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))


# -- loading and bad inputs -----------------------------------------------------------------------------------------
_STEM = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv": "0", "bn": "1"}
_OWNER = {"fc1": "mlp.0", "fc2": "mlp.3"}
_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def _state_dict_of(model):
    """Our variables (an unrolled model's) under the reference's names and layouts (the inverse of the loader,
    written separately)."""
    assert not model.scan_blocks
    out = {}
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, (nnx.Param, nnx.BatchStat)):
            continue
        parts = [str(p) for p in path]
        value = np.asarray(var[...])
        if parts[0] == "downsample_layers":
            parts[2] = _STEM[parts[2]]
        conv = parts[-2] in ("pos_embed", "lepe") or parts[0] == "downsample_layers"
        if parts[0] == "stages":
            del parts[2]  # stages.{i}.blocks.{j} -> stages.{i}.{j}
            attn = model.stages[int(parts[1])].blocks[int(parts[2])].attn
            if parts[-2] == "qkv" and isinstance(attn, BiLevelRoutingAttention):
                parts[-2] = "qkv.qkv"  # BRA wraps its Linear in a QKVLinear; ours is regrouped per head
                value = per_head_qkv_fused(value, attn.qk_dim)
        if parts[-1] == "kernel" and not conv:  # Linear kernels [*in, *out] -> torch [out, in]
            inputs = 2 if parts[-2] in ("wo", "proj") else 1  # per-head inputs [heads, head_dim]
            value = value.reshape(int(np.prod(value.shape[:inputs])), -1).T
        elif parts[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1)
        elif parts[-1] == "bias":
            value = value.reshape(-1)
        parts[-2] = _OWNER.get(parts[-2], parts[-2])
        parts[-1] = _LEAF.get(parts[-1], parts[-1])
        out[".".join(parts)] = value
    return out


def test_loader_is_strict():
    fx = load_model_fixture("biformer_reduced_official")
    if fx is None:
        pytest.skip("fixture biformer_reduced_official.npz not found under ../shared/fixtures")
    c = fx.config
    arch = dict(depths=c["depth"], embed_dims=c["embed_dim"], n_win=c["n_win"], topks=c["topks"])
    model = _abstract_zeros("biformer_tiny", num_classes=10, **arch)
    sd = fx.state_dict
    with pytest.raises(StateDictError, match="stages.1.0.attn.wo.bias"):
        convert.load_biformer(model, {k: v for k, v in sd.items() if k != "stages.1.0.attn.wo.bias"})
    with pytest.raises(StateDictError, match="not used.*stages.0.0.gamma1"):
        convert.load_biformer(model, {**sd, "stages.0.0.gamma1": np.ones(32, np.float32)})
    with pytest.raises(StateDictError, match="attn.lepe.weight"):
        convert.load_biformer(model, {**sd, "stages.3.0.attn.lepe.weight": np.zeros((128, 1, 3, 3), np.float32)})
    with_scale = _abstract_zeros("biformer_tiny", num_classes=10, layer_scale=1e-6, **arch)
    with pytest.raises(StateDictError, match="gamma1"):
        convert.load_biformer(with_scale, sd)


def test_round_trip_with_layer_scale():
    arch = dict(depths=(1, 1), embed_dims=(32, 64), mlp_ratios=(2, 2), topks=(2, -2), n_win=2, img_size=32,
                layer_scale=1e-6, num_classes=3)
    src = abstract_model(lambda: models.create_model("biformer_tiny", scan_blocks=False, **arch), seed=5)
    sd = _state_dict_of(src)
    assert {"stages.0.0.gamma1", "stages.0.0.attn.qkv.qkv.weight", "stages.1.0.attn.proj.bias",
            "downsample_layers.0.4.running_var", "norm.running_mean"} <= set(sd)
    dst = convert.load_biformer(_abstract_zeros("biformer_tiny", **arch), sd)  # scanned: loads across layouts
    assert dst.scan_blocks
    pure = lambda m: nnx.to_pure_dict(nnx.state(m, (nnx.Param, nnx.BatchStat)))
    got = biformer_convert.to_unrolled(pure(dst), dst)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), pure(src), got)


def test_bad_inputs_raise_value_errors(pico):
    with pytest.raises(ValueError, match="`x` must have rank 4"):
        pico(jnp.zeros((3, 64, 64)))
    with pytest.raises(ValueError, match="`x` channels"):
        pico(jnp.zeros((1, 64, 64, 1)))
    bad = [dict(embed_dims=(32, 64, 96)), dict(topks=(1, 2, 0, -2)), dict(qk_dims=(32, 48, 96, 128)),
           dict(before_attn_dwconv=5)]
    for overrides in bad:
        with pytest.raises(ValueError, match=next(iter(overrides))):
            BiFormer(**{"depths": (1, 1, 2, 1), "embed_dims": (32, 64, 96, 128), "n_win": 2,
                        "topks": (1, 2, 4, -2), "img_size": 64, **overrides}, rngs=nnx.Rngs(0))
