"""Fixtures of the training tests: the embedded datasets built once per session, and the command line."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:  # tiny_train_models / tiny_config, for configs that name them
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    from jaxattn.train import datasets
    path = str(tmp_path_factory.mktemp("tfds"))
    for name in datasets.EMBEDDED:
        datasets.prepare(name, path)
    return path
