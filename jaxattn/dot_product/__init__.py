"""Scaled dot-product attention (softmax), heads-last, with causal/window/segment masks, bias and GQA."""
from jaxattn.dot_product.api import dot_product_attention

__all__ = ["dot_product_attention"]
