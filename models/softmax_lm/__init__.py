"""Causal softmax-attention LM (rotary, GQA, KV cache): the baseline matched to each TransNormer size."""
from jaxattn.models.softmax_lm import variants
from jaxattn.models.softmax_lm.model import SoftmaxAttention, softmax_lm
