"""The softmax-attention baseline of the TransNormer comparison: same data, size and training as
`configs/transnormer.py`, with standard causal softmax attention.

    python -m train.main --config configs/softmax_lm.py --workdir workdirs/softmax_lm
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base, transnormer


NAMED = ()  # the `:arg` variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"unknown softmax_lm config {arg!r}; only the default (stdlib bytes) exists so far")
    return transnormer.lm_recipe(base.get_config(), model="softmax_lm_tiny")
