"""The softmax-attention baseline of the TransNormer comparison: same data, size and training as
`configs/transnormer.py`, with standard causal softmax attention.

    python -m train.main --config configs/softmax_lm.py --workdir workdirs/softmax_lm
    # the published sizes' baselines, byte-level on TFDS lm1b prepared in DATA_DIR (see configs/transnormer.py):
    python -m train.main --config configs/softmax_lm.py:385m_lm1b --config.data_dir=DATA_DIR --workdir workdirs/sm385m
    # context parallelism over 4 devices: 'ring' (K/V rotate, zigzag load balance; seq_len % 8 == 0),
    # 'allgather' (K/V gathered once; cheap with few KV heads) or 'ulysses' (all-to-all; heads % 4 == 0)
    python -m train.main --config configs/softmax_lm.py --config.mesh.context=4 --config.context_parallel=ring
    # attention variants of the stdlib baseline (same data, steps and seed): gated attention (elementwise output
    # gate), attention sinks, mixture-of-heads (1 shared + 3 routed heads, 2 chosen per token)
    python -m train.main --config configs/softmax_lm.py:tiny_gated --workdir workdirs/softmax_lm_gated
    python -m train.main --config configs/softmax_lm.py:tiny_sinks --workdir workdirs/softmax_lm_sinks
    python -m train.main --config configs/softmax_lm.py:tiny_moh --workdir workdirs/softmax_lm_moh
    # packed documents (segment ids; not with context_parallel): add --config.pack_documents=True
"""
from __future__ import annotations

import ml_collections

from jaxattn.configs import base, transnormer


# The stdlib variants: model options of `softmax_lm_tiny` (the published sizes have registered names,
# `softmax_lm_385m_gated` etc.).
STDLIB_VARIANTS = {
    "tiny_gated": dict(attention_gate="elementwise"),
    "tiny_gated_headwise": dict(attention_gate="headwise"),
    "tiny_sinks": dict(attention_sinks=True),
    "tiny_moh": dict(heads_routing=(1, 3, 2)),
}
NAMED = transnormer.NAMED + tuple(STDLIB_VARIANTS)  # the `:arg` variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg in STDLIB_VARIANTS:
        return transnormer.lm_recipe(base.get_config(), model="softmax_lm_tiny", **STDLIB_VARIANTS[arg])
    if arg:
        return transnormer.published_recipe(base.get_config(), arg, family="softmax_lm")
    return transnormer.lm_recipe(base.get_config(), model="softmax_lm_tiny")
