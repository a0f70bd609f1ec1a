"""Small building blocks of TransNormerLLM-style stacks (shared with the softmax baseline)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # TransNormerLLM's init_std for every Linear and the embedding
_init = nnx.initializers.normal(INIT_STD)


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32) -> nnx.Linear:
    """Bias-free Linear with N(0, 0.02) weights (all projections of both families)."""
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=_init, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """SimpleRMSNorm: `x * rsqrt(mean(x^2) + eps)` over the last axis, no weight; computed in fp32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class SGLU(nnx.Module):
    """Simple GLU channel mixer: `W3 (W1 x * W2 x)`, no activation, no biases. `[..., d] -> [..., d]`."""

    def __init__(self, d_model: int, glu_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.l1 = dense(d_model, glu_dim, rngs=rngs, dtype=dtype)
        self.l2 = dense(d_model, glu_dim, rngs=rngs, dtype=dtype)
        self.l3 = dense(glu_dim, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.l3(self.l1(x) * self.l2(x))
