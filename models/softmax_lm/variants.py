"""Softmax baselines matched to each TransNormer size (same stack; SGLU widened by `matched_glu_dim` so the
parameter count is within 2% of the TransNormer variant). `num_kv_heads=` gives GQA; the glu width then re-matches
unless `glu_dim=` is given too."""
from __future__ import annotations

from flax import nnx

from jaxattn.models.lm.configs import TRANSNORMER_SIZES, matched_glu_dim
from jaxattn.models.registry import register
from jaxattn.models.softmax_lm.model import softmax_lm


def _build(size, rngs, overrides):
    cfg = {**TRANSNORMER_SIZES[size], **overrides}
    if "glu_dim" not in overrides:
        kv = cfg.get("num_kv_heads") or cfg["num_heads"]
        cfg["glu_dim"] = matched_glu_dim(cfg["d_model"], cfg["num_heads"], kv, cfg["glu_dim"])
    return softmax_lm(rngs=rngs, **cfg)


@register("softmax_lm_tiny", kind="lm")
def softmax_lm_tiny(*, rngs: nnx.Rngs, **overrides):
    """Softmax baseline of `transnormer_tiny`: d 128, 4 layers, 4 heads (MHA), glu 395, byte vocab 260.
    Parameters: 935,424 (transnormer_tiny: 935,040)."""
    return _build("tiny", rngs, overrides)


@register("softmax_lm_385m", kind="lm")
def softmax_lm_385m(*, rngs: nnx.Rngs, **overrides):
    """Softmax baseline of `transnormer_385m`: d 1024, 24 layers, 8 heads, glu 3157, vocab 64000.
    Parameters: 464,494,592."""
    return _build("385m", rngs, overrides)


@register("softmax_lm_1b", kind="lm")
def softmax_lm_1b(*, rngs: nnx.Rngs, **overrides):
    """Softmax baseline of `transnormer_1b`: d 2048, 16 layers, 16 heads, glu 6315, vocab 64000.
    Parameters: 1,151,369,216."""
    return _build("1b", rngs, overrides)


@register("softmax_lm_7b", kind="lm")
def softmax_lm_7b(*, rngs: nnx.Rngs, **overrides):
    """Softmax baseline of `transnormer_7b`: d 4096, 30 layers, 32 heads, glu 12373, vocab 64000.
    Parameters: 7,098,736,640."""
    return _build("7b", rngs, overrides)
