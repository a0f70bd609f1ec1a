"""BiFormer (Zhu et al. 2023): `biformer_pico` on the embedded digits by default; published models on TFDS data.

    # default: biformer_pico on scikit-learn digits (64 px), a few minutes on a 2-core CPU
    python -m train.main --config configs/biformer.py --workdir workdirs/biformer
    # ImageNet-1k, the official DeiT-style recipe: 300 epochs, AdamW, base lr 5e-4 per 512 images (1e-3 at batch
    # 1024), wd 0.05, 5 warmup epochs, cosine to 1e-5, no clipping, RandAugment(2, 9), mixup 0.8 / cutmix 1.0,
    # label smoothing 0.1 (random erasing and repeated augmentation are not implemented)
    python -m train.main --config configs/biformer.py:tiny_imagenet --config.data_dir=/data/tfds --workdir w/bt
    # sizes: tiny, small, base (drop path 0.1, 0.15, 0.4)
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base

DROP_PATH = {"tiny": 0.1, "small": 0.15, "base": 0.4}
NAMED = tuple(f"{s}_imagenet" for s in DROP_PATH)  # the `:arg` variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.digits_recipe(base.get_config(), model="biformer_pico", drop_path_rate=0.0)
    if arg:
        size, _, dataset = arg.partition("_")
        if size not in DROP_PATH or dataset != "imagenet":
            raise ValueError(f"unknown biformer config {arg!r}; expected <size>_imagenet with size in "
                             f"{', '.join(DROP_PATH)}, e.g. 'tiny_imagenet'")
        base.imagenet_recipe(c, image_size=224, learning_rate=1e-3, warmup_epochs=5.0)
        c.model = f"biformer_{size}"
        c.model_kwargs = ml_collections.ConfigDict({"img_size": 224, "drop_path_rate": DROP_PATH[size]})
        c.optimizer.grad_clip_norm = 0.0
    return c
