"""Fixture checks of the vision models as backbones: logits and stage features from one compiled call, compared
with the reference code's (features recorded by `data/make_fixture_features.py`, first image, float16)."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from jaxattn.testing.fixtures import load_model_fixture

DATA = pathlib.Path(__file__).resolve().parent / "data"
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # small models: XLA:CPU compile time dominates
# Tolerance per element: `FEATURE_RTOL` of the feature's largest magnitude for the computation (fp32 ports agree
# to ~1e-6 of it), plus float16 storage rounding, at most 2^-11 of the stored value (and 2^-25 absolute where the
# stored value is subnormal).
FEATURE_RTOL = 1e-4
FP16_ROUNDING = 2.0 ** -11


def loaded_fixture(fixture_name: str, build, load):
    """`(fixture, model, outputs)`: the fixture (skips when absent), `build(fixture.config)` filled by
    `load(model, fixture.state_dict)`, and its `fixture_outputs`."""
    fixture = load_model_fixture(fixture_name)
    if fixture is None:
        pytest.skip(f"fixture {fixture_name}.npz not found (../shared/fixtures beside the checkout or "
                    f"$JAXATTN_FIXTURES)")
    model = build(fixture.config)
    load(model, fixture.state_dict)
    return fixture, model, fixture_outputs(model, fixture.images_nhwc)


def fixture_outputs(model, images) -> dict:
    """`model` (loaded) in eval mode, one compiled call on `images`: `logits`, `final` and `features` of
    `forward_intermediates(intermediates_only=False)`, and `normed`, the last feature with `norm=True`. XLA merges
    the repeated forward passes, so this costs one compile of the model."""
    model.eval()
    graph, state = nnx.split(model)

    def run(state, x):
        m = nnx.merge(graph, state)
        final, features = m.forward_intermediates(x, intermediates_only=False)
        normed = m.forward_intermediates(x, indices=1, norm=True)[0]
        return dict(logits=m(x), final=final, features=features, normed=normed)

    out = jax.jit(run).lower(state, images).compile(FAST_COMPILE)(state, images)
    return jax.tree.map(np.asarray, out)


_FORWARDS: list = []  # [(key, executable)]: a list, since a model's GraphDef may hold lists (not hashable)


def jit_forward(model, x):
    """`model(x)` under jit, compiled without XLA's backend optimisations and reused for the same graph and
    shapes; any module (models and single layers), in modes that update no state (eval mode, or no BatchNorm:
    the state it returns is not written back)."""
    graph, state = nnx.split(model)
    leaves, tree = jax.tree.flatten((state, x))
    key = (graph, tree, [(a.shape, a.dtype) for a in leaves])
    for known, executable in _FORWARDS:
        if known == key:
            return executable(state, x)
    executable = jax.jit(lambda state, x: nnx.merge(graph, state)(x)).lower(state, x).compile(FAST_COMPILE)
    _FORWARDS.append((key, executable))
    return executable(state, x)


def assert_feature_info_equals_timm(model, timm_name: str) -> None:
    """`model.feature_info` equals timm's for `timm_name` (recorded from timm by data/make_fixture_features.py)."""
    timm = json.loads((DATA / "timm_feature_info.json").read_text())[timm_name]
    assert [{k: f[k] for k in ("num_chs", "reduction", "module")} for f in model.feature_info] == timm, timm_name


def recorded(fixture_name: str) -> dict:
    with np.load(DATA / f"{fixture_name}_features.npz") as z:
        return {k: z[k] for k in z.files}


def assert_close_to_recorded(what: str, ours, reference) -> float:
    """`ours` (fp32) against a float16 record; returns the largest difference over the feature's largest
    magnitude."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    scale = np.abs(reference).max()
    bound = FEATURE_RTOL * scale + FP16_ROUNDING * np.abs(reference) + 2.0 ** -25
    excess = np.abs(ours - reference) - bound
    assert excess.max() <= 0, (f"{what}: {int((excess > 0).sum())} values off by up to "
                               f"{np.abs(ours - reference).max() / scale:.2e} of the largest magnitude")
    return float(np.abs(ours - reference).max() / scale)


def assert_features_match_reference(model, outputs: dict, fixture_name: str, *, final: str) -> None:
    """The first image's stage features (and `final`: 'final' for timm's `intermediates_only=False` output,
    'normed_last' where it is the final norm of the last feature) equal the recorded reference ones; the
    feature list matches the reference's (timm's `feature_info`, or the recorded tap modules)."""
    ref = recorded(fixture_name)
    count = len([k for k in ref if k[0] == "f" and k[1:].isdigit()])
    assert len(outputs["features"]) == count
    for i, feature in enumerate(outputs["features"]):
        assert_close_to_recorded(f"{fixture_name} feature {i}", feature[0], ref[f"f{i}"])
    assert_close_to_recorded(f"{fixture_name} final", outputs["final"][0], ref[final])
    # norm=True: the final norm on the last feature (timm's MaxViT and HaloNet have none outside the head)
    normed = ref.get("normed_last", ref[f"f{count - 1}"])
    assert_close_to_recorded(f"{fixture_name} norm=True", outputs["normed"][0], normed)
    info = [{k: f[k] for k in ("num_chs", "reduction", "module")} for f in model.feature_info]
    if "feature_info" in ref:
        assert info == json.loads(str(ref["feature_info"]))
    else:
        assert [f["module"] for f in info] == json.loads(str(ref["modules"]))
    assert [f["num_chs"] for f in info] == [ref[f"f{i}"].shape[-1] for i in range(count)]


def write_safetensors(path, state_dict) -> None:
    """A float32 `.safetensors` file, written from the format's specification (the reader is pinned to the official
    writer's output by `test_convert_files.py`)."""
    header, offset, blobs = {}, 0, []
    for name, value in state_dict.items():
        blob = np.ascontiguousarray(value, "<f4").tobytes()
        header[name] = dict(dtype="F32", shape=list(np.shape(value)), data_offsets=[offset, offset + len(blob)])
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    pathlib.Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
