"""Access to the recorded reference-model fixtures (`../shared/fixtures` beside the repository, or
`$JAXATTN_FIXTURES`). See that folder's README for the format."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np


def fixtures_dir() -> pathlib.Path | None:
    env = os.environ.get("JAXATTN_FIXTURES")
    candidates = [pathlib.Path(env)] if env else []
    repo = pathlib.Path(__file__).resolve().parents[2]
    candidates.append(repo.parent / "shared" / "fixtures")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@dataclasses.dataclass
class ModelFixture:
    state_dict: dict[str, np.ndarray]
    images_nhwc: np.ndarray
    logits: np.ndarray
    config: dict


def load_model_fixture(name: str) -> ModelFixture | None:
    """`name` like 'maxvit_reduced_timm'; None when the fixtures folder or file is absent."""
    folder = fixtures_dir()
    if folder is None or not (folder / f"{name}.npz").exists():
        return None
    with np.load(folder / f"{name}.npz") as z:
        state_dict = {k[3:]: z[k] for k in z.files if k.startswith("sd/")}
        images = z["__input__"].transpose(0, 2, 3, 1)
        return ModelFixture(state_dict, images, z["__logits__"], json.loads(str(z["__config__"])))
