"""DiNAT (Hassani & Shi 2022): `dinat_pico` on the embedded digits by default; published models on TFDS data.

    # default: dinat_pico on scikit-learn digits (64 px, dilations 2-1-1-1), a few minutes on a 2-core CPU
    python -m train.main --config configs/dinat.py --workdir workdirs/dinat
    # ImageNet-1k, the NAT/DiNAT recipe: 300 epochs, batch 1024, AdamW 1e-3, wd 0.05, 20 warmup epochs, cosine,
    # RandAugment(2, 9), mixup 0.8 / cutmix 1.0, label smoothing 0.1, clip 5.0 (random erasing is not implemented)
    python -m train.main --config configs/dinat.py:mini_imagenet --config.data_dir=/data/tfds --workdir w/dm
    # sizes: mini, tiny, small, base, large (drop path 0.2, 0.2, 0.3, 0.5, 0.35)
    # context parallelism: image rows sharded over 2 devices, halo exchange of border rows in every attention
    # layer whose map splits into shards that hold the window's halo, others run the single-device op (at 224 px
    # the undilated layers of stages 1-3 shard; dilated windows span nearly the whole map, and so does kernel 7
    # on the 64 px default's small maps)
    python -m train.main --config configs/dinat.py:mini_imagenet --config.mesh.context=2 --config.context_parallel=halo
    # pods: heads and MLP units split over `tensor` (mesh.tensor must divide every stage's heads: base and large),
    # weights over `fsdp`; bf16 compute, remat per pair of blocks (scanned); check a slice ahead of time with
    python -m train.aot --config configs/dinat.py:base_imagenet --topology v5e:2x2 --config.mesh.data=1 \
        --config.mesh.tensor=4 --config.batch_size=8 --config.dtype=bfloat16
    # 384 px (the 384 checkpoints' dilations 13, 6, 3, 1): --config.image_size=384 --config.model_kwargs.img_size=384
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base

DROP_PATH = {"mini": 0.2, "tiny": 0.2, "small": 0.3, "base": 0.5, "large": 0.35}
NAMED = tuple(f"{s}_imagenet" for s in DROP_PATH)  # the `:arg` variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.digits_recipe(base.get_config(), model="dinat_pico", drop_path_rate=0.0)
    if arg:
        size, _, dataset = arg.partition("_")
        if size not in DROP_PATH or dataset != "imagenet":
            raise ValueError(f"unknown dinat config {arg!r}; expected <size>_imagenet with size in "
                             f"{', '.join(DROP_PATH)}, e.g. 'mini_imagenet'")
        base.imagenet_recipe(c, image_size=224)
        c.model = f"dinat_{size}"
        c.model_kwargs = ml_collections.ConfigDict({"img_size": 224, "drop_path_rate": DROP_PATH[size]})
    return c
