"""scikit-learn's handwritten digits as a TFDS dataset: real data that ships inside a package.

1,797 grayscale 8x8 images of the digits 0-9 (UCI optical recognition of handwritten digits, 4-bit intensities).
The split is fixed: a permutation drawn once with `numpy.random.default_rng(0)`, the first 1,437 images for `train`
and the remaining 360 for `test`. Intensities 0..16 are stored rescaled to uint8 0..255; images are `[8, 8, 1]`
and resized by the input pipeline to whatever the model needs.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from jaxattn.train.datasets.embedded import EmbeddedBuilder

NUM_TRAIN = 1437
SPLIT_SEED = 0

with registered.skip_registration():  # read back by path, never by global name lookup

    class Builder(EmbeddedBuilder):
        """scikit-learn digits, fixed 1,437 / 360 train/test split."""

        name = "digits"

        def _info(self):
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }),
                supervised_keys=("image", "label"),
                homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            order = np.random.default_rng(SPLIT_SEED).permutation(1797)
            return {"train": self._generate_examples(order[:NUM_TRAIN]),
                    "test": self._generate_examples(order[NUM_TRAIN:])}

        def _generate_examples(self, indices):
            from sklearn.datasets import load_digits
            digits = load_digits()
            images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
            for i in indices:
                yield int(i), {"image": images[i], "label": int(digits.target[i])}
