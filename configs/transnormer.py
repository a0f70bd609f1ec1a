"""TransNormerLLM (Qin et al. 2023): a byte-level language model on the CPython standard library by default.

    # default: transnormer_tiny, bytes of the stdlib's source files, held-out modules for bits per byte
    python -m train.main --config configs/transnormer.py --workdir workdirs/transnormer
    # the equally sized softmax-attention baseline, trained the same way:
    python -m train.main --config configs/softmax_lm.py --workdir workdirs/softmax_lm

The corpus is every `*.py` file of this Python's standard library except tests, one document each, ended by an
end-of-document token (id 258 of the 260-token byte vocabulary: 256 bytes + pad, bos, eos, sep); the held-out split
is a fixed set of whole modules (`argparse`, `csv`, `difflib`, `fractions`, `heapq`, `json`, `statistics`,
`textwrap`, `zipfile`), see `train/datasets/stdlib_bytes`. Evaluation reports `eval/bits_per_byte` over every byte
of the held-out modules (each predicted once, with up to `seq_len` bytes of context).
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base


NAMED = ()  # the `:arg` variants


def lm_recipe(c: ml_collections.ConfigDict, *, model: str, **model_kwargs) -> ml_collections.ConfigDict:
    """The byte-level stdlib recipe shared with the softmax baseline (`configs/softmax_lm.py`)."""
    c.task = "lm"
    c.model = model
    c.model_kwargs = ml_collections.ConfigDict(model_kwargs)
    c.dataset, c.train_split, c.eval_split = "stdlib_bytes", "train", "test"
    c.seq_len = 256
    c.batch_size, c.eval_batch_size, c.eval_max_examples = 32, 64, 0
    c.num_train_steps = 1000  # 8.2M tokens (~0.7 epoch)
    c.optimizer.update(learning_rate=3e-3, min_learning_rate=1e-4, warmup_steps=100, weight_decay=0.1, b2=0.95,
                       grad_clip_norm=1.0)
    c.log_every, c.eval_every, c.checkpoint_every = 50, 500, 250
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"unknown transnormer config {arg!r}; only the default (stdlib bytes) exists so far")
    # One lightning-attention chunk per 256-byte window: on CPU the chunked scan at the default block of 64 is
    # ~6x slower per step than the intra-chunk quadratic form at this length (same result).
    return lm_recipe(base.get_config(), model="transnormer_tiny", block_size=256)
