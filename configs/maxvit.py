"""MaxViT (Tu et al. 2022): `maxvit_pico` on the embedded digits by default; the published models on TFDS data.

    # default: maxvit_pico on scikit-learn digits (64 px), a few minutes on a 2-core CPU
    python -m train.main --config configs/maxvit.py --workdir workdirs/maxvit
    # the paper's ImageNet-1k recipe (300 epochs, batch 4096, AdamW 3e-3, RandAugment(2, 15), mixup 0.8, ...)
    python -m train.main --config configs/maxvit.py:tiny_imagenet --config.data_dir=/data/tfds --workdir w/mt
    # also small_imagenet, base_imagenet, large_imagenet; and <size>_cifar10 (e.g. pico_cifar10) at 32 px
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base

SIZES = ("pico", "tiny", "small", "base", "large")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = "maxvit_pico"
    c.model_kwargs = ml_collections.ConfigDict({"img_size": 64, "drop_path_rate": 0.0})
    c.image_size = 64
    c.input.crop_scale = (0.6, 1.0)
    c.input.crop_ratio = (0.85, 1.18)
    c.input.flip = False  # digits are not mirror-symmetric
    c.input.crop_pct = 1.0
    c.batch_size = 64
    c.num_epochs = 12.0
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.05
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 100
    if arg:
        _published(c, arg)
    return c


def _published(c, arg: str):
    size, _, dataset = arg.partition("_")
    if size not in SIZES or dataset not in ("imagenet", "cifar10"):
        raise ValueError(f"unknown maxvit config {arg!r}; expected <size>_<dataset> with size in {SIZES} and "
                         f"dataset in ('imagenet', 'cifar10'), e.g. 'tiny_imagenet'")
    c.model = f"maxvit_{size}"
    c.model_kwargs = ml_collections.ConfigDict({"img_size": 224 if dataset == "imagenet" else 32})
    c.image_size = c.model_kwargs.img_size
    c.input.mean = c.input.std = (0.5, 0.5, 0.5)  # the TF reference normalises to [-1, 1]
    c.input.flip = True
    c.input.crop_scale = (0.08, 1.0)
    c.input.crop_ratio = (3 / 4, 4 / 3)
    c.input.randaugment_ops, c.input.randaugment_magnitude = 2, 15.0
    c.input.mixup_alpha, c.input.label_smoothing = 0.8, 0.1
    c.optimizer.update(learning_rate=3e-3, min_learning_rate=1e-5, warmup_steps=10_000, weight_decay=0.05,
                       grad_clip_norm=1.0, ema_decay=0.9999)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 5_000, 2_000
    c.data_threads, c.data_workers = 8, 16
    if dataset == "imagenet":
        c.dataset, c.eval_split = "imagenet2012", "validation"
        c.input.crop_pct = 0.95  # timm's maxvit_*_tf_224 evaluation crop
        c.batch_size, c.eval_batch_size, c.num_epochs = 4096, 1024, 300.0
    else:
        c.dataset, c.eval_split = "cifar10", "test"
        c.input.crop_scale, c.input.crop_pct = (0.35, 1.0), 1.0
        c.batch_size, c.eval_batch_size, c.num_epochs = 512, 1000, 300.0
        c.optimizer.warmup_steps = 2_000
