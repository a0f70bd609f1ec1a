"""Published TransNormerLLM sizes and the glu width that makes the softmax baseline match them."""
from __future__ import annotations

from jaxattn.models.lm.stack import BYTE_VOCAB_SIZE

# d_model, num_layers, num_heads, glu_dim, vocab_size
TRANSNORMER_SIZES = {
    # embedded default (byte-level), sized to train on 2 CPU cores in minutes
    "tiny": dict(d_model=128, num_layers=4, num_heads=4, glu_dim=352, vocab_size=BYTE_VOCAB_SIZE),
    # OpenNLPLab TransNormerLLM-385M (models.md)
    "385m": dict(d_model=1024, num_layers=24, num_heads=8, glu_dim=2816, vocab_size=64000),
    # OpenNLPLab TransNormerLLM-1B (models.md)
    "1b": dict(d_model=2048, num_layers=16, num_heads=16, glu_dim=5632, vocab_size=64000),
    # OpenNLPLab TransNormerLLM-7B, Hugging Face config.json (decoder_embed_dim 4096, decoder_layers 30,
    # decoder_attention_heads 32, glu_dim 11008, vocab 64000); see the variant docstring
    "7b": dict(d_model=4096, num_layers=30, num_heads=32, glu_dim=11008, vocab_size=64000),
}


def matched_glu_dim(d_model: int, num_heads: int, num_kv_heads: int, glu_dim: int) -> int:
    """SGLU width for a softmax layer with the parameters of a GLA layer.

    GLA projects to q, k, v, u and back (`5 d^2`); softmax attention has q, o (`2 d^2`) and k, v of
    `num_kv_heads` heads. The difference goes to the SGLU (`3 d` parameters per unit of width).
    """
    head_dim = d_model // num_heads
    diff = 5 * d_model * d_model - (2 * d_model * d_model + 2 * d_model * num_kv_heads * head_dim)
    return glu_dim + round(diff / (3 * d_model))
