"""What is learned: the loss, the training metrics and the evaluation metrics of each task, on the device.

- `Classification`: images -> logits `[B, K]`. Batches `{'image': uint8 [B, H, W, C], 'label': int [B]}` (plus
  `'mask'` in evaluation). Normalisation, mixup/cutmix and label smoothing happen here, on the device.
- `LanguageModel`: token ids -> next-token logits `[B, T, V]`. Batches `{'inputs': int [B, T], 'targets': int
  [B, T]}` (plus `'segment_ids'` `[B, T]` with `config.pack_documents`, passed to the model, and `'mask'` `[B]` in
  evaluation). Reports bits per byte: the mean cross-entropy in bits over the
  targets that are bytes (ids < 256; end-of-document markers are predicted in training but not counted).

`eval_sums` returns sums (not means) so that batches, hosts and padded examples (mask 0) combine exactly.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from jaxattn.models.layers import auxiliary

from . import augment

LN2 = math.log(2.0)


class Classification:
    # Batch keys whose dim 1 is sharded over the `context` mesh axis: image rows (context parallelism).
    sequence_keys = ("image",)

    def __init__(self, config, num_classes: int):
        self.num_classes = num_classes
        inp = config.input
        self.mean = jnp.asarray(inp.mean, jnp.float32) * 255.0
        self.std = jnp.asarray(inp.std, jnp.float32) * 255.0
        self.label_smoothing = float(inp.label_smoothing)
        self.mix = dict(mixup_alpha=float(inp.mixup_alpha), cutmix_alpha=float(inp.cutmix_alpha),
                        switch_prob=float(inp.mix_switch_prob), prob=float(inp.mix_prob))

    def _images(self, batch):
        return (batch["image"].astype(jnp.float32) - self.mean) / self.std

    def train_loss(self, model, batch, key):
        images = self._images(batch)
        targets = augment.smooth_labels(batch["label"], self.num_classes, self.label_smoothing)
        images, targets = augment.mixup_cutmix(key, images, targets, **self.mix)
        logits = model(images).astype(jnp.float32)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, {"accuracy": accuracy}

    def eval_sums(self, model, batch):
        logits = model(self._images(batch)).astype(jnp.float32)
        mask = batch["mask"].astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"correct": jnp.sum((logits.argmax(-1) == batch["label"]) * mask),
                "nll": jnp.sum(nll * mask), "count": jnp.sum(mask)}

    @staticmethod
    def summarize(sums):
        count = max(float(sums["count"]), 1.0)
        return {"eval/accuracy": float(sums["correct"]) / count, "eval/loss": float(sums["nll"]) / count}


class LanguageModel:
    sequence_keys = ("inputs", "targets", "segment_ids")  # their length is sharded over the `context` mesh axis

    def __init__(self, config, vocab_size: int):
        del config
        self.vocab_size = vocab_size

    @staticmethod
    def _logits(model, batch):
        if "segment_ids" in batch:
            return model(batch["inputs"], segment_ids=batch["segment_ids"]).astype(jnp.float32)
        return model(batch["inputs"]).astype(jnp.float32)

    def train_loss(self, model, batch, key):
        del key
        logits = self._logits(model, batch)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        extra = auxiliary.total(model)  # e.g. MoH's load balance (0 for models without one)
        return loss + extra, {"bits_per_byte": loss / LN2, "auxiliary_loss": extra}

    def eval_sums(self, model, batch):
        """Cross-entropy summed over byte targets only: end-of-document markers are not bytes."""
        logits = self._logits(model, batch)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["mask"].astype(jnp.float32)[:, None] * (batch["targets"] < 256)
        return {"nll": jnp.sum(nll * mask), "count": jnp.sum(mask)}

    @staticmethod
    def summarize(sums):
        loss = float(sums["nll"]) / max(float(sums["count"]), 1.0)
        return {"eval/loss": loss, "eval/bits_per_byte": loss / LN2}


def make_task(config, num_outputs: int):
    if config.task == "classification":
        return Classification(config, num_outputs)
    if config.task == "lm":
        return LanguageModel(config, num_outputs)
    raise ValueError(f"`task` must be 'classification' or 'lm', got {config.task!r}")
