"""Scaled dot-product attention (softmax), heads-last, with causal/window/segment masks, bias and GQA."""
from jaxattn.dot_product.api import dot_product_attention
from jaxattn.dot_product.backward import dot_product_attention_backward

__all__ = ["dot_product_attention", "dot_product_attention_backward"]
