"""Registered TransNormerLLM sizes. Counts are exact (untied head, LRPE angles on layer 0, no biases).

The paper's round names count a tied head; this implementation keeps the untied LM head of TransNormerLLM, so
e.g. `transnormer_385m` has 65.5M more parameters than its name.
"""
from __future__ import annotations

from flax import nnx

from jaxattn.models.lm.configs import TRANSNORMER_SIZES
from jaxattn.models.registry import register
from jaxattn.models.transnormer.model import transnormer


def _build(size, rngs, overrides):
    return transnormer(rngs=rngs, **{**TRANSNORMER_SIZES[size], **overrides})


@register("transnormer_tiny", kind="lm")
def transnormer_tiny(*, rngs: nnx.Rngs, **overrides):
    """TransNormerLLM tiny (embedded default, byte vocab 260): d 128, 4 layers, 4 heads, glu 352.
    Parameters: 935,040."""
    return _build("tiny", rngs, overrides)


@register("transnormer_385m", kind="lm")
def transnormer_385m(*, rngs: nnx.Rngs, **overrides):
    """TransNormerLLM-385M: d 1024, 24 layers, 8 heads, glu 2816, vocab 64000 (OpenNLPLab config).
    Parameters: 464,520,192 (untied head; 398,984,192 without the head's 65,536,000)."""
    return _build("385m", rngs, overrides)


@register("transnormer_1b", kind="lm")
def transnormer_1b(*, rngs: nnx.Rngs, **overrides):
    """TransNormerLLM-1B: d 2048, 16 layers, 16 heads, glu 5632, vocab 64000 (OpenNLPLab config).
    Parameters: 1,151,338,496 (untied head)."""
    return _build("1b", rngs, overrides)


@register("transnormer_7b", kind="lm")
def transnormer_7b(*, rngs: nnx.Rngs, **overrides):
    """TransNormerLLM-7B: d 4096, 30 layers, 32 heads, glu 11008, vocab 64000.

    Source: the configuration published with OpenNLPLab's TransNormerLLM-7B checkpoint on Hugging Face
    (config.json: decoder_embed_dim 4096, decoder_layers 30, decoder_attention_heads 32, glu_dim 11008); it was
    not readable in the sources available when this was written (models.md: "not public in the sources read"),
    so these figures are from that config as recalled and should be re-checked against it.
    Parameters: 7,098,863,616 (untied head)."""
    return _build("7b", rngs, overrides)
