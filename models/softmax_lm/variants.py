"""Softmax baselines matched to each TransNormer size (same stack; SGLU widened by `matched_glu_dim` so the
parameter count is within 2% of the TransNormer variant). `num_kv_heads=` gives GQA; the glu width then re-matches
unless `glu_dim=` is given too.

Published attention variants of each size (same glu width as the baseline, so the parameters grow only by the
variant's own): `_gated` (gated attention, elementwise sigmoid output gate, Qiu et al. 2025 / Qwen3-Next), `_sinks`
(one learned sink logit per head, GPT-OSS) and `_moh` (mixture-of-heads, Jin et al. 2024: a quarter of the heads
shared, the rest routed, half of those chosen per token: 62.5% of heads active, within the paper's 50-90%)."""
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


VARIANTS = {
    "gated": lambda cfg: {"attention_gate": "elementwise"},
    "sinks": lambda cfg: {"attention_sinks": True},
    "moh": lambda cfg: {"heads_routing": _moh_routing(cfg["num_heads"])},
}


def _moh_routing(num_heads: int) -> tuple[int, int, int]:
    shared = max(1, num_heads // 4)
    routed = num_heads - shared
    return shared, routed, max(1, routed // 2)


def _register_variant(size: str, variant: str):
    name = f"softmax_lm_{size}_{variant}"

    def build(*, rngs: nnx.Rngs, **overrides):
        cfg = {**TRANSNORMER_SIZES[size], **overrides}
        return _build(size, rngs, {**VARIANTS[variant](cfg), **overrides})
    build.__name__ = name
    build.__doc__ = f"`softmax_lm_{size}` with the `{variant}` attention variant (see the module docstring)."
    register(name, kind="lm")(build)


for _size in ("385m", "1b", "7b"):
    for _variant in VARIANTS:
        _register_variant(_size, _variant)
