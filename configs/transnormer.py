"""TransNormerLLM (Qin et al. 2023): a byte-level language model on the CPython standard library by default.

    # default: transnormer_tiny, bytes of the stdlib's source files, held-out modules for bits per byte
    python -m train.main --config configs/transnormer.py --workdir workdirs/transnormer
    # the equally sized softmax-attention baseline, trained the same way:
    python -m train.main --config configs/softmax_lm.py --workdir workdirs/softmax_lm
    # context parallelism: the sequence sharded over 4 devices (LASP-2: one all-gather of lightning states per
    # layer); the loss curve is that of --config.mesh.context=1 on the same data
    python -m train.main --config configs/transnormer.py --config.mesh.context=4 --config.context_parallel=lasp2
    # the published sizes (385M, 1B, 7B), byte-level on TFDS lm1b prepared in DATA_DIR:
    python -m train.main --config configs/transnormer.py:385m_lm1b --config.data_dir=DATA_DIR --workdir workdirs/tn385m
    # packed documents: segment ids reset the lightning state at every document (any config; LASP-2 too)
    python -m train.main --config configs/transnormer.py --config.pack_documents=True

The corpus is every `*.py` file of this Python's standard library except tests, one document each, ended by an
end-of-document token (id 258 of the 260-token byte vocabulary: 256 bytes + pad, bos, eos, sep); the held-out split
is a fixed set of whole modules (`argparse`, `csv`, `difflib`, `fractions`, `heapq`, `json`, `statistics`,
`textwrap`, `zipfile`), see `train/datasets/stdlib_bytes`. Evaluation reports `eval/bits_per_byte` over every byte
of the held-out modules (each predicted once, with up to `seq_len` bytes of context).
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base


SIZES = ("385m", "1b", "7b")
NAMED = tuple(f"{size}_lm1b" for size in SIZES)  # the `:arg` variants
# Per size: peak learning rate and the mesh (the 7B model's parameters and optimiser state shard over fsdp).
PUBLISHED = {"385m": (3e-4, {"data": -1, "fsdp": 1, "tensor": 1, "context": 1}),
             "1b": (3e-4, {"data": -1, "fsdp": 1, "tensor": 1, "context": 1}),
             "7b": (1.5e-4, {"data": 1, "fsdp": -1, "tensor": 1, "context": 1})}


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
    # Segment ids for the packed windows: each document attends (softmax) or carries its state (lightning) only
    # within itself; off by default, so earlier runs stay comparable.
    c.pack_documents = False
    return c


def published_recipe(c: ml_collections.ConfigDict, arg: str, *, family: str) -> ml_collections.ConfigDict:
    """`<size>_lm1b`: the published model size, byte-level, on TFDS `lm1b` (One Billion Word; ~4.1 GB of text).

    The paper's corpus and tokenizer are not available offline, so this is a byte-level adaptation with the paper's
    optimiser settings (AdamW, beta2 0.95, weight decay 0.1, clipping 1.0, 2k warmup then cosine): 2048-byte windows
    packed from consecutive sentences, 256 windows per step (0.5M bytes), 20k steps (~2.5 epochs). Evaluation is
    bits per byte over the first 4,096 windows of the test split.
    """
    size, _, dataset = arg.partition("_")
    if size not in PUBLISHED or dataset != "lm1b":
        raise ValueError(f"unknown {family} config {arg!r}; named variants: {', '.join(NAMED)}")
    learning_rate, mesh = PUBLISHED[size]
    c.task, c.model, c.model_kwargs = "lm", f"{family}_{size}", ml_collections.ConfigDict()
    c.dataset, c.train_split, c.eval_split, c.text_key = "lm1b", "train", "test", "text"
    c.seq_len = 2048
    c.batch_size, c.eval_batch_size, c.eval_max_examples = 256, 256, 4096
    c.num_train_steps = 20_000
    c.optimizer.update(learning_rate=learning_rate, min_learning_rate=learning_rate / 10, warmup_steps=2000,
                       weight_decay=0.1, b2=0.95, grad_clip_norm=1.0)
    c.mesh = ml_collections.ConfigDict(mesh)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 1000
    c.pack_documents = False
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        return published_recipe(base.get_config(), arg, family="transnormer")
    # One lightning-attention chunk per 256-byte window: on CPU the chunked scan at the default block of 64 is
    # ~6x slower per step than the intra-chunk quadratic form at this length (same result).
    return lm_recipe(base.get_config(), model="transnormer_tiny", block_size=256)
