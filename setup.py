"""Maps the repository's top-level folders into the single import package `jaxattn`.

`pip install` puts exactly one name on the user's import path, `jaxattn`; the folders `kernels/`, `models/`,
`train/` and `configs/` become `jaxattn.kernels`, `jaxattn.models`, `jaxattn.train` and `jaxattn.configs`.
Metadata lives in pyproject.toml; only the package layout is computed here, so new subpackages need no edit.
"""
from setuptools import find_packages, setup

SUBPACKAGE_FOLDERS = ("kernels", "models", "train", "configs")

package_dir = {"jaxattn": "jaxattn"}
packages = ["jaxattn"] + [f"jaxattn.{p}" for p in find_packages("jaxattn")]
for folder in SUBPACKAGE_FOLDERS:
    package_dir[f"jaxattn.{folder}"] = folder
    packages.append(f"jaxattn.{folder}")
    packages += [f"jaxattn.{folder}.{p}" for p in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
