"""Checkpoint files for the converters: `.safetensors` (read against a file the official library wrote), `.npz`,
torch pickles only with `allow_pickle=True`, no torch import otherwise, and clear errors for a missing file, an
unknown or broken format, and another model's checkpoint."""
import sys

import ml_dtypes
import numpy as np
import pytest

import feature_checks
from jaxattn import models
from jaxattn.models import convert
from jaxattn.models.convert.files import read_safetensors, read_state_dict
from jaxattn.testing.fixtures import load_model_fixture
from jaxattn.testing.model_init import abstract_model

SAMPLE = feature_checks.DATA / "sample.safetensors"  # written by data/make_safetensors_sample.py


def _expected_sample():
    return {
        "blocks.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "blocks.0.half": np.arange(3, dtype=np.float16) - 1.5,
        "blocks.0.bf16": (np.arange(4).reshape(2, 2) * 0.25).astype(ml_dtypes.bfloat16),
        "bn.num_batches_tracked": np.array(12, np.int64),
        "ids": np.arange(4, dtype=np.int32) - 2,
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
    }


def test_safetensors_written_by_the_official_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` would fail: the default path never needs it
    got = read_state_dict(str(SAMPLE))
    want = _expected_sample()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)


def test_npz_and_mappings(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    sd = {"a.weight": np.ones((2, 3), np.float32), "a.bias": np.zeros(3, np.float16)}
    np.savez(tmp_path / "w.npz", **sd)
    got = read_state_dict(tmp_path / "w.npz")
    assert sorted(got) == sorted(sd) and got["a.bias"].dtype == np.float16
    assert read_state_dict(sd) is sd


def test_torch_pickles_need_allow_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "ckpt.pth"
    sd = {"w": torch.arange(6.0).reshape(2, 3), "h": torch.tensor([0.5, 1.5], dtype=torch.bfloat16)}
    torch.save({"model": sd, "epoch": 3, "args": {"lr": 0.1}}, path)  # as training scripts save them
    with pytest.raises(ValueError, match="allow_pickle=True"):
        read_state_dict(path)
    got = read_state_dict(path, allow_pickle=True)
    np.testing.assert_array_equal(got["w"], np.arange(6.0).reshape(2, 3))
    assert got["h"].dtype == ml_dtypes.bfloat16 and got["h"].tolist() == [0.5, 1.5]
    torch.save({"epoch": 3}, tmp_path / "none.bin")
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(tmp_path / "none.bin", allow_pickle=True)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        read_state_dict(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="directory"):
        read_state_dict(tmp_path)
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match="unknown checkpoint format '.h5'"):
        read_state_dict(tmp_path / "w.h5")
    with pytest.raises(ValueError, match="mapping of names to arrays or a file path"):
        read_state_dict(42)
    data = SAMPLE.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(tmp_path / "junk.safetensors")
    np.savez(tmp_path / "obj.npz", a=np.array([{}], dtype=object))
    with pytest.raises(ValueError, match="without pickles"):
        read_state_dict(tmp_path / "obj.npz")


def test_another_models_checkpoint_names_the_first_mismatched_key(tmp_path):
    fixture = load_model_fixture("biformer_reduced_official")
    if fixture is None:
        pytest.skip("fixture biformer_reduced_official.npz not found")
    path = tmp_path / "biformer.npz"
    np.savez(path, **fixture.state_dict)
    dinat = abstract_model(lambda: models.create_model("dinat_pico", num_classes=10), fill="zeros")
    with pytest.raises(convert.StateDictError, match=r"does not fit DiNAT: it has no key 'patch_embed.proj.0.weight'"
                                                      r".*checkpoint of another model"):
        convert.load_dinat(dinat, path)
    wider = abstract_model(lambda: models.create_model("biformer_pico", num_classes=10, embed_dims=(64, 64, 96, 128),
                                                       n_win=7, topks=(1, 4, 16, -2)), fill="zeros")
    with pytest.raises(convert.StateDictError, match="downsample_layers.0.0.weight.*another size"):
        convert.load_biformer(wider, path)
