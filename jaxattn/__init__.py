"""jaxattn: efficient attention for JAX.

Functional ops on heads-last arrays `[batch, *tokens, heads, head_dim]`. Each op takes `implementation=`:
'reference' (obviously correct, for tests), 'xla' (blocked, memory-lean), kernels where registered, or None for
the best available on the current platform.
"""
from jaxattn.dot_product import dot_product_attention

__version__ = "0.1.0"

__all__ = ["dot_product_attention"]
