"""Defaults shared by every training config; each family file (`configs/<family>.py`) starts from `get_config()`.

Every field, its meaning and its default (override any from the command line, `--config.optimizer.learning_rate=1e-3`):

    task                'classification' (images -> logits) or 'lm' (bytes -> next-byte logits)
    model               registry name (`jaxattn.models.list_models()`) or 'package.module:builder'
    model_kwargs        overrides passed to the model builder (e.g. img_size, drop_path_rate)
    dataset             TFDS name; 'digits' and 'stdlib_bytes' are embedded (built on first use, no download)
    data_dir            TFDS data dir ('' -> $TFDS_DATA_DIR or ~/tensorflow_datasets)
    train_split, eval_split
    image_size          square input side for vision models
    seq_len             tokens (bytes) per training window for language models
    text_key            the language-model dataset's document feature: a uint8 tensor ('bytes', the embedded
                        stdlib corpus) or a text feature ('text' of `lm1b`), read as UTF-8 bytes
    input.*             preprocessing and augmentation (see `train/augment.py`)
    batch_size          global batch size (all processes together)
    eval_batch_size     global evaluation batch size
    eval_max_examples   evaluate on the first N held-out examples (0 = all)
    num_train_steps     steps to train (-1: derive from num_epochs)
    num_epochs          epochs to train when num_train_steps is -1
    optimizer.*         AdamW: learning_rate, min_learning_rate, warmup_steps, schedule ('cosine' | 'constant'),
                        weight_decay, b1, b2, eps, grad_clip_norm (0 = off), ema_decay (0 = no EMA)
    mesh                device mesh axes -> sizes (-1 = the remaining devices): data (batch), fsdp (batch, and
                        parameters / optimizer state sharded), tensor (Megatron: heads, MLP units and vocabulary
                        split), context (sequences / image rows split); `tensor` may be omitted (size 1)
    context_parallel    attention strategy over the `context` mesh axis ('' = none: GSPMD shards the sequence
                        or image rows and gathers them for each attention layer); per family: softmax_lm 'ring' |
                        'allgather' | 'ulysses', transnormer 'lasp2', dinat / halonet 'halo'. With mesh.context 1
                        the single-device ops run, so the same config is the reference. Example:
                        `--config.mesh.context=4 --config.context_parallel=ring`
    logical_axis_rules  overrides of the one logical-axis table (`jaxattn.models.layers.axes.RULES`): pairs
                        (logical name, mesh axis | (mesh axes...) | None), e.g. (('activation_embed', 'tensor'),)
    remat               rematerialisation per block: 'none' | 'full' | 'dots_saveable' |
                        'dots_with_no_batch_dims_saveable' (jax.checkpoint policies; passed as the model's remat=)
    dtype               compute dtype ('float32' | 'bfloat16'); softmax, norms, logits, losses stay float32
    param_dtype         parameter (and so optimizer state) dtype, 'float32' 
    seed                initialisation, data order, augmentation and dropout all derive from it
    log_every, eval_every (0 = only at the end), checkpoint_every, keep_checkpoints, async_checkpointing
    compile_fast        compile the steps with XLA's backend optimisations off (faster compiles, slower steps)
    data_threads, data_workers (grain worker processes; 0 = threads only), prefetch_batches
"""
from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.model = ""
    c.model_kwargs = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.data_dir = ""
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 64
    c.seq_len = 256
    c.text_key = "bytes"

    c.input = ml_collections.ConfigDict(dict(
        channels=3, image_key="image", label_key="label",
        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), crop_pct=0.875, flip=True,
        randaugment_ops=0, randaugment_magnitude=9.0,
        mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, mix_switch_prob=0.5, label_smoothing=0.0,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ))

    c.batch_size = 128
    c.eval_batch_size = 256
    c.eval_max_examples = 0
    c.num_train_steps = -1
    c.num_epochs = 10.0

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, min_learning_rate=1e-5, warmup_steps=100, schedule="cosine", weight_decay=0.05,
        b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0, ema_decay=0.0,
    ))

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "context": 1})
    c.context_parallel = ""
    c.logical_axis_rules = ()
    c.remat = "none"
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.seed = 0

    c.log_every = 20
    c.eval_every = 0
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.async_checkpointing = True

    c.compile_fast = False
    c.data_threads = 2
    c.data_workers = 0
    c.prefetch_batches = 2
    return c


IMAGENET_TRAIN_EXAMPLES = 1_281_167


def imagenet_recipe(c: ml_collections.ConfigDict, *, image_size: int = 224, batch_size: int = 1024,
                    epochs: float = 300.0, learning_rate: float = 1e-3, warmup_epochs: float = 20.0,
                    weight_decay: float = 0.05) -> ml_collections.ConfigDict:
    """The DeiT / Swin style ImageNet-1k recipe shared by the vision families (each family file adjusts it):
    AdamW, linear warmup then cosine to 1e-5, clipping at 5.0, RandAugment(2, 9), mixup 0.8 / cutmix 1.0 (switch
    0.5), label smoothing 0.1, random-resized crop + flip, evaluation at crop 0.875."""
    c.dataset, c.train_split, c.eval_split = "imagenet2012", "train", "validation"
    c.image_size = image_size
    c.input.update(mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=True, crop_scale=(0.08, 1.0),
                   crop_ratio=(3 / 4, 4 / 3), crop_pct=0.875, randaugment_ops=2, randaugment_magnitude=9.0,
                   mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, mix_switch_prob=0.5, label_smoothing=0.1)
    c.batch_size, c.eval_batch_size, c.num_epochs, c.num_train_steps = batch_size, 1000, epochs, -1
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
    c.optimizer.update(learning_rate=learning_rate, min_learning_rate=1e-5, schedule="cosine",
                       warmup_steps=int(warmup_epochs * steps_per_epoch), weight_decay=weight_decay,
                       grad_clip_norm=5.0, ema_decay=0.0)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 5 * steps_per_epoch, 2_000
    c.data_threads, c.data_workers, c.prefetch_batches = 8, 16, 4
    return c


def digits_recipe(c: ml_collections.ConfigDict, *, model: str, image_size: int = 64,
                  **model_kwargs) -> ml_collections.ConfigDict:
    """The embedded default of the vision families: a small model on scikit-learn digits upscaled to
    `image_size`, light crop jitter (no flips: digits are not mirror-symmetric), 30 epochs of batch 64."""
    c.model = model
    c.model_kwargs = ml_collections.ConfigDict({"img_size": image_size, **model_kwargs})
    c.dataset, c.train_split, c.eval_split = "digits", "train", "test"
    c.image_size = image_size
    c.input.update(crop_scale=(0.6, 1.0), crop_ratio=(0.85, 1.18), flip=False, crop_pct=1.0)
    c.batch_size, c.num_epochs = 64, 30.0
    c.optimizer.update(learning_rate=3e-3, warmup_steps=30)
    c.log_every, c.eval_every, c.checkpoint_every = 10, 100, 100
    return c
