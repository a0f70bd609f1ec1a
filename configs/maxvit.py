"""MaxViT (Tu et al. 2022): `maxvit_pico` on the embedded digits by default; the published models on TFDS data.

    # default: maxvit_pico on scikit-learn digits (64 px), a few minutes on a 2-core CPU
    python -m train.main --config configs/maxvit.py --workdir workdirs/maxvit
    # the paper's ImageNet-1k recipe (300 epochs, batch 4096, AdamW 3e-3, 10k warmup steps, EMA 0.9999,
    # RandAugment(2, 15), mixup 0.8, label smoothing 0.1, clip 1.0)
    python -m train.main --config configs/maxvit.py:tiny_imagenet --config.data_dir=/data/tfds --workdir w/mt
    # sizes: tiny, small, base, large (each _imagenet at 224 px); pico_cifar10 ... large_cifar10 at 32 px
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base

SIZES = ("pico", "tiny", "small", "base", "large")
DROP_PATH = {"pico": 0.1, "tiny": 0.2, "small": 0.3, "base": 0.4, "large": 0.6}  # 1 - survival probability
# the `:arg` variants
NAMED = tuple(f"{s}_imagenet" for s in SIZES[1:]) + tuple(f"{s}_cifar10" for s in SIZES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.digits_recipe(base.get_config(), model="maxvit_pico", drop_path_rate=0.0)
    if arg:
        size, _, dataset = arg.partition("_")
        if size not in SIZES or dataset not in ("imagenet", "cifar10"):
            raise ValueError(f"unknown maxvit config {arg!r}; expected <size>_<dataset> with size in {SIZES} and "
                             f"dataset in ('imagenet', 'cifar10'), e.g. 'tiny_imagenet'")
        pixels = 224 if dataset == "imagenet" else 32
        base.imagenet_recipe(c, image_size=pixels, batch_size=4096, learning_rate=3e-3)
        c.model = f"maxvit_{size}"
        c.model_kwargs = ml_collections.ConfigDict({"img_size": pixels, "drop_path_rate": DROP_PATH[size]})
        c.input.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # the TF reference maps pixels to [-1, 1]
                       randaugment_magnitude=15.0, cutmix_alpha=0.0, crop_pct=0.95)  # timm maxvit_*_tf eval crop
        c.optimizer.update(warmup_steps=10_000, grad_clip_norm=1.0, ema_decay=0.9999)
        if dataset == "cifar10":
            c.dataset, c.eval_split = "cifar10", "test"
            c.batch_size, c.eval_batch_size = 512, 1000
            c.input.update(crop_scale=(0.35, 1.0), crop_pct=1.0)
            c.optimizer.warmup_steps = 2_000
            c.eval_every = 5_000
    return c
