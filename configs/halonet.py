"""HaloNet (Vaswani et al. 2021): `halonet_pico` on the embedded digits by default; published models on TFDS data.

    # default: halonet_pico on scikit-learn digits (64 px), a few minutes on a 2-core CPU
    python -m train.main --config configs/halonet.py --workdir workdirs/halonet
    # ImageNet-1k at the paper's resolution of each model (H0-H2 256 px, ..., H7 640 px: the paper's 600 does not
    # fit its blocks; timm hybrids 256 px)
    python -m train.main --config configs/halonet.py:h1_imagenet --config.data_dir=/data/tfds --workdir w/h1
    # variants: h0 ... h7, 26t, 50ts, se33ts (timm hybrids), each with _imagenet
    # context parallelism: image rows sharded over 2 devices, halo exchange in every halo attention layer whose
    # rows split into whole blocks per device (the others run the single-device op)
    python -m train.main --config configs/halonet.py --config.mesh.context=2 --config.context_parallel=halo

The paper's exact optimiser settings are not public in our references; the ImageNet variants use the AdamW recipe
shared by the other families here (300 epochs, batch 1024, lr 1e-3, warmup 20 epochs, cosine, RandAugment(2, 9),
mixup 0.8 / cutmix 1.0, label smoothing 0.1). Override any of it from the command line.
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base

# variant -> (registry name, input pixels)
VARIANTS = {
    "h0": ("halonet_h0", 256), "h1": ("halonet_h1", 256), "h2": ("halonet_h2", 256), "h3": ("halonet_h3", 320),
    "h4": ("halonet_h4", 384), "h5": ("halonet_h5", 448), "h6": ("halonet_h6", 512), "h7": ("halonet_h7", 640),
    "26t": ("halonet26t", 256), "50ts": ("halonet50ts", 256), "se33ts": ("sehalonet33ts", 256),
}
NAMED = tuple(f"{v}_imagenet" for v in VARIANTS)  # the `:arg` variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.digits_recipe(base.get_config(), model="halonet_pico", drop_path_rate=0.0)
    if arg:
        variant, _, dataset = arg.partition("_")
        if variant not in VARIANTS or dataset != "imagenet":
            raise ValueError(f"unknown halonet config {arg!r}; expected <variant>_imagenet with variant in "
                             f"{', '.join(VARIANTS)}, e.g. 'h1_imagenet'")
        model, pixels = VARIANTS[variant]
        base.imagenet_recipe(c, image_size=pixels)
        c.model = model
        c.model_kwargs = ml_collections.ConfigDict({"img_size": pixels, "drop_path_rate": 0.1})
    return c
