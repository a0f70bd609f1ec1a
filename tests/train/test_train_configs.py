"""The training configs: every file and `:arg` variant loads and validates, names a registered model, documents its
command; bad values fail naming the field; and a one-step run of every config (embedded data, or TFDS mock data for
the published datasets)."""
from __future__ import annotations

import glob
import importlib
import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxattn.configs import base
from jaxattn.train import metrics, train, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                  if os.path.basename(p) not in ("__init__.py", "base.py"))
VARIANTS = [(f, None) for f in FAMILIES] + [
    (f, arg) for f in FAMILIES for arg in importlib.import_module(f"jaxattn.configs.{f}").NAMED]


def _load(family, arg=None):
    return importlib.import_module(f"jaxattn.configs.{family}").get_config(arg)


def _registered(name):
    from jaxattn.models import list_models
    return name in list_models()


def test_every_family_has_a_config():
    assert {"maxvit", "halonet", "dinat", "biformer", "transnormer", "softmax_lm"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_docstring_carries_the_command(family):
    doc = importlib.import_module(f"jaxattn.configs.{family}").__doc__
    assert f"python -m train.main --config configs/{family}.py" in doc


@pytest.mark.parametrize("family,arg", VARIANTS)
def test_config_validates(family, arg):
    config = _load(family, arg)
    validate.validate(config, num_devices=8, process_count=2)
    if not _registered(config.model):
        pytest.skip(f"model {config.model!r} is not in the registry yet")
    from jaxattn.models import get_entry
    assert get_entry(config.model).kind == ("vision" if config.task == "classification" else "lm")


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_variant_lists_the_known_ones(family):
    with pytest.raises(ValueError, match="unknown .* config 'huge_mnist'"):
        _load(family, "huge_mnist")


BAD_VALUES = [
    ("batch_size", 0, "must be a positive integer"),
    ("batch_size", 100, "divisible by the data-parallel mesh size 8"),
    ("task", "detection", "must be 'classification' or 'lm'"),
    ("model", "", "must name a registered model"),
    ("num_train_steps", -5, "must be positive"),
    ("optimizer.learning_rate", float("nan"), "positive finite"),
    ("optimizer.learning_rate", -1.0, "positive finite"),
    ("optimizer.min_learning_rate", 1.0, r"\[0, learning_rate\]"),
    ("optimizer.schedule", "linear", "'cosine' or 'constant'"),
    ("optimizer.ema_decay", 1.0, r"\[0, 1\)"),
    ("optimizer.b2", 1.5, r"\[0, 1\)"),
    ("input.crop_scale", (0.5, 2.0), "0 < lo <= hi <= 1"),
    ("input.label_smoothing", 1.0, r"\[0, 1\)"),
    ("input.mean", (0.5,), "need 3 values each"),
    ("mesh.data", 3, "needs 3 devices, but there are 8"),
    ("mesh.fsdp", 0, "positive integers"),
    ("eval_every", -1, "must be >= 0"),
    ("mesh.pipeline", 2, "axes must be among"),
    ("remat", "most", "must be one of .*'dots_saveable'"),
    ("dtype", "int8", "floating-point dtype"),
    ("param_dtype", "half-ish", "floating-point dtype"),
    ("logical_axis_rules", (("embed", "model"),), "'embed' maps to \\['model'\\]"),
    ("logical_axis_rules", (("embed",),), "entries must be"),
]


@pytest.mark.parametrize("field,value,message", BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_bad_values_name_the_field(field, value, message):
    config = base.get_config()
    config.model = "maxvit_pico"
    config.batch_size, config.eval_batch_size = 64, 64
    node, _, leaf = field.rpartition(".")
    target = config if not node else config[node]
    if field == "mesh.data":
        target.update(data=3, fsdp=1)
    else:
        target[leaf] = value
    with pytest.raises(validate.ConfigError, match=rf"config\.{field.split('.')[0]}.*{message}"):
        validate.validate(config, num_devices=8, process_count=1)


def test_mesh_without_a_required_axis():
    config = base.get_config()
    config.model = "maxvit_pico"
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    with pytest.raises(validate.ConfigError, match="needs a 'context' axis"):
        validate.validate(config, num_devices=1, process_count=1)


def _one_step(config, workdir):
    config.num_train_steps, config.log_every, config.eval_every, config.checkpoint_every = 1, 1, 0, 1
    config.batch_size, config.eval_batch_size, config.eval_max_examples = 8, 8, 8
    config.data_threads, config.compile_fast = 1, True
    result = train.train_and_evaluate(config, str(workdir))
    loss = [r["train/loss"] for r in metrics.read_metrics(str(workdir)) if "train/loss" in r]
    assert len(loss) == 1 and np.isfinite(loss[0])
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_of_the_default(family, tfds_dir, tmp_path):
    config = _load(family)
    if not _registered(config.model):
        pytest.skip(f"model {config.model!r} is not in the registry yet")
    config.data_dir = tfds_dir
    if config.task == "lm":
        config.seq_len = 64
    result = _one_step(config, tmp_path)
    assert set(result) >= ({"eval/accuracy"} if config.task == "classification" else {"eval/bits_per_byte"})


def test_one_step_of_a_published_recipe_on_mock_data(tmp_path):
    """`maxvit:tiny_imagenet`'s pipeline (RandAugment, mixup, EMA, ImageNet records) with a tiny model."""
    import tensorflow_datasets as tfds
    config = _load("maxvit", "tiny_imagenet")
    config.model, config.image_size = "tiny_train_models:classifier", 32  # the recipe is under test, not the model
    config.model_kwargs = ml_collections.ConfigDict()
    config.data_dir = str(tmp_path / "tfds")
    config.data_workers = 0
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        result = _one_step(config, tmp_path / "work")
    assert 0.0 <= result["eval/accuracy"] <= 1.0
    assert jax.device_count() == 1


def test_one_step_of_a_published_language_model_recipe_on_mock_data(tmp_path):
    """`transnormer:385m_lm1b`'s pipeline (lm1b text documents packed into byte windows) with the tiny model."""
    import tensorflow_datasets as tfds
    config = _load("transnormer", "385m_lm1b")
    config.model, config.seq_len = "transnormer_tiny", 64
    config.data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        result = _one_step(config, tmp_path / "work")
    assert np.isfinite(result["eval/bits_per_byte"])
