"""Shared language-model machinery: the pre-norm decoder stack, SRMSNorm, SGLU, rotary/LRPE positions and the
decode cache. Families (`transnormer`, `softmax_lm`) plug a token mixer into `CausalLM`."""
from jaxattn.models.lm.cache import DecodeCache
from jaxattn.models.lm.layers import SGLU, Projection, srms_norm
from jaxattn.models.lm.positions import apply_rotary, lrpe
from jaxattn.models.layers.tracing import count_params
from jaxattn.models.lm.stack import BYTE_VOCAB_SIZE, CausalLM

__all__ = ["BYTE_VOCAB_SIZE", "CausalLM", "DecodeCache", "Projection", "SGLU", "apply_rotary", "count_params", "lrpe",
           "srms_norm"]
