"""`Dense` whose weight gradient XLA:CPU runs as a fast matmul when the layer narrows (`in >= out`).

The weight gradient of `x [M, in] @ kernel` is `x^T g`, a dot contracting the token axis, which is the major dim of
both operands ("TN"). XLA:CPU's YNNPACK path does not take that form and Eigen runs it, slowly when `in` is wide:
MaxViT-T's FFN output layer (stage 0: M = 25088, 256 -> 64) takes 13 ms that way against 7-9 ms for an explicit
transpose of `x` plus a plain matmul (stage 1, 512 -> 128: 15 vs 6 ms). For widening layers the transpose costs as
much as it saves, so those keep autodiff. Identical forward; gradients equal up to fp32 summation order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.models.layers.dense import Dense, dense


@jax.custom_vjp
def _matmul_nn_grad(x, kernel):
    return jnp.dot(x, kernel)


def _fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _bwd(residuals, g):
    x, kernel = residuals
    dx = jnp.dot(g, kernel.T).astype(x.dtype)
    # The barrier keeps the transpose: XLA would otherwise fold it back into a TN dot.
    dkernel = jnp.dot(jax.lax.optimization_barrier(x.T), g).astype(kernel.dtype)
    return dx, dkernel


_matmul_nn_grad.defvjp(_fwd, _bwd)


def dense_nn_grad(x, kernel, bias=None):
    """`dense(x, kernel, bias)`; on CPU, for `in >= out`, with the weight gradient as a transpose + plain matmul."""
    if jax.default_backend() != "cpu" or kernel.shape[0] < kernel.shape[1]:
        return dense(x, kernel, bias)
    y = _matmul_nn_grad(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    return y if bias is None else y + bias


class DenseNNGrad(Dense):
    """`Dense` (same parameters, initialisation, dtypes and loaders) computed with `dense_nn_grad`."""

    def __call__(self, inputs):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype or jnp.result_type(inputs, kernel)
        inputs, kernel = inputs.astype(dtype), kernel.astype(dtype)
        return dense_nn_grad(inputs, kernel, None if bias is None else bias.astype(dtype))
