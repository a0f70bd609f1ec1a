"""The embedded datasets, packaged as TFDS builders (ArrayRecord) so that they and the published TFDS datasets are
read by the same `tfds.data_source` path.

- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), fixed train/test split.
- `stdlib_bytes`: the source files of this Python's standard library as bytes, with a fixed held-out set of modules.

Neither needs a download: `prepare(name, data_dir)` builds them from what is installed on the machine.
"""
from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import sys

# TFDS 4.9.10 touches `importlib_resources.abc.Traversable` whenever it resolves a builder's code path, but no longer
# declares the backport as a dependency on Python >= 3.9. The standard library's module has the same `abc`.
if importlib.util.find_spec("importlib_resources") is None:
    sys.modules.setdefault("importlib_resources", importlib.resources)

# name -> module (relative to this package) defining `Builder`.
EMBEDDED = {"digits": ".digits.digits", "stdlib_bytes": ".stdlib_bytes.stdlib_bytes"}


def builder_class(name: str):
    """The TFDS builder class of the embedded dataset `name`."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; embedded: {', '.join(sorted(EMBEDDED))}")
    return importlib.import_module(EMBEDDED[name], __name__).Builder


def prepare(name: str, data_dir: str):
    """Builds the embedded dataset `name` under `data_dir` if it is not there yet; returns the builder."""
    cls = builder_class(name)
    builder = cls(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except FileExistsError:
            # Another run sharing `data_dir` finished preparing first (TFDS builds in a temporary folder and
            # renames it); its copy is identical, built from the same installed files.
            builder = cls(data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                raise
    return builder
