"""The CPython standard library's own source files as a byte-level language-modelling corpus.

Every `*.py` file under `sysconfig.get_paths()["stdlib"]` except test code (any path part named `test`, `tests` or
`idle_test`, or starting with `test_`) and installed packages (`site-packages`), one record per file, in sorted path
order. The `test` split holds out whole top-level modules, `HELD_OUT_MODULES` (a module `x` is `x.py` or the package
`x/`); everything else is `train`. The files differ between Python versions, so each version is its own builder
config (`py311`, ...): a corpus built by another Python is never silently mixed in.
"""
from __future__ import annotations

import pathlib
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from jaxattn.train.datasets.embedded import EmbeddedBuilder

HELD_OUT_MODULES = ("argparse", "csv", "difflib", "fractions", "heapq", "json", "statistics", "textwrap", "zipfile")
_SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
PYTHON_CONFIG = f"py{sys.version_info.major}{sys.version_info.minor}"


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def source_files(root: pathlib.Path | None = None) -> dict[str, list[pathlib.Path]]:
    """The corpus files by split, `{"train": [...], "test": [...]}`, paths relative to `root`, sorted."""
    root = stdlib_root() if root is None else root
    out = {"train": [], "test": []}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_PARTS or part.startswith("test_") for part in rel.parts):
            continue
        held_out = rel.parts[0].removesuffix(".py") in HELD_OUT_MODULES
        out["test" if held_out else "train"].append(rel)
    return out


with registered.skip_registration():  # read back by path, never by global name lookup

    class Builder(EmbeddedBuilder):
        """Python standard library sources as bytes; `test` = the held-out modules."""

        name = "stdlib_bytes"
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=PYTHON_CONFIG,
                                                   description=f"Python {sys.version.split()[0]} standard library")]

        def _info(self):
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "path": tfds.features.Text(),
                    "bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                }),
                homepage="https://docs.python.org/3/library/",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            files = source_files()
            return {split: self._generate_examples(paths) for split, paths in files.items()}

        def _generate_examples(self, paths):
            root = stdlib_root()
            for rel in paths:
                data = (root / rel).read_bytes()
                yield str(rel), {"path": str(rel), "bytes": np.frombuffer(data, dtype=np.uint8)}
