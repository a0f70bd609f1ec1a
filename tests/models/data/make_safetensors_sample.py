"""Writes `sample.safetensors` with the official `safetensors` library, to pin `convert.files.read_safetensors`
(written from the format's specification) to files as they are really written: every dtype the state dicts use,
a 0-d and an empty tensor, metadata. Values are `arange`-based so the test recomputes them.

    python tests/models/data/make_safetensors_sample.py     # needs torch and safetensors (not test dependencies)
"""
import pathlib

import torch
from safetensors.torch import save_file


def sample() -> dict:
    return {
        "blocks.0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "blocks.0.half": torch.arange(3, dtype=torch.float16) - 1.5,
        "blocks.0.bf16": torch.arange(4, dtype=torch.bfloat16).reshape(2, 2) * 0.25,
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "ids": torch.arange(4, dtype=torch.int32) - 2,
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }


if __name__ == "__main__":
    path = pathlib.Path(__file__).resolve().parent / "sample.safetensors"
    save_file(sample(), str(path), metadata={"format": "pt"})
    print(f"wrote {path} ({path.stat().st_size} bytes)")
