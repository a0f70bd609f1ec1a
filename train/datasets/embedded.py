"""The base of the embedded TFDS builders: TFDS finds each builder's folder and code by its own file's path.

TFDS derives both from the import name, which the repository's package layout (train/ installed as
jaxattn.train) breaks, and registration by global name is skipped: the builders are read back by path.
"""
from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import registered

with registered.skip_registration():

    class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
        """Subclass in the dataset's own module (under `registered.skip_registration()`)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Initial release."}

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            source = epath.Path(sys.modules[cls.__module__].__file__)
            cls.pkg_dir_path = source.parent
            cls.code_path = tfds.core.utils.classproperty(classmethod(lambda _: source))
