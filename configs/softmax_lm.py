"""The softmax-attention baseline of the TransNormer comparison: same data, size and training as
`configs/transnormer.py`, with standard causal softmax attention.

    python -m train.main --config configs/softmax_lm.py --workdir workdirs/softmax_lm
    # the published sizes' baselines, byte-level on TFDS lm1b prepared in DATA_DIR (see configs/transnormer.py):
    python -m train.main --config configs/softmax_lm.py:385m_lm1b --config.data_dir=DATA_DIR --workdir workdirs/sm385m
    # context parallelism over 4 devices: 'ring' (K/V rotate, zigzag load balance; seq_len % 8 == 0),
    # 'allgather' (K/V gathered once; cheap with few KV heads) or 'ulysses' (all-to-all; heads % 4 == 0)
    python -m train.main --config configs/softmax_lm.py --config.mesh.context=4 --config.context_parallel=ring
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base, transnormer


NAMED = transnormer.NAMED  # the `:arg` variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        return transnormer.published_recipe(base.get_config(), arg, family="softmax_lm")
    return transnormer.lm_recipe(base.get_config(), model="softmax_lm_tiny")
