"""Training-mode BatchNorm with a hand-written backward (for XLA:CPU), and an `nnx.BatchNorm` that uses it.

Autodiff of BatchNorm's batch statistics (two-pass mean and variance, then normalise) differentiates each step
separately: the cotangent goes back through the normalisation, the variance's square and the two means, with
several passes over the activation (and fp32 copies of it). The closed form needs two reductions and one
elementwise pass:
    dx = scale * rstd * (g - mean(g) - xhat * mean(g * xhat)),  dscale = sum(g * xhat),  dbias = sum(g)
(plus the terms of the returned batch mean and variance when their cotangents are not zero).
Same values as `nnx.BatchNorm` (two-pass variance, statistics in at least fp32).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes


def _stats_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
    """Normalises `x [..., C]` by its statistics over all leading axes; returns `(y, mean [C], var [C])`.

    `y = (x - mean) * rsqrt(var + epsilon) * scale + bias` in `x`'s dtype; `var` is the biased (two-pass)
    variance; statistics are computed in `promote_types(x.dtype, float32)`.
    """
    return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    xf = x.astype(_stats_dtype(x))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * (rstd * scale) + bias
    return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale)


def _fwd(x, scale, bias, epsilon):
    return _forward(x, scale, bias, epsilon)


def _bwd(epsilon, residuals, cotangents):
    x, mean, rstd, scale = residuals
    g, g_mean, g_var = cotangents
    n = x.size // x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    gf = g.astype(mean.dtype)
    xc = x.astype(mean.dtype) - mean
    dbias = jnp.sum(gf, axis=axes)
    dscale = jnp.sum(gf * xc, axis=axes) * rstd
    mul = scale.astype(mean.dtype) * rstd
    # d/dx of y, of the returned mean (1/n) and of the returned variance (2 (x - mean) / n).
    coef_c = (2.0 * g_var - mul * rstd * dscale) / n
    dx = mul * gf + (g_mean - mul * dbias) / n + xc * coef_c
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_fwd, _bwd)


class BatchNormVJP(nnx.BatchNorm):
    """`nnx.BatchNorm` (same parameters, statistics and loaders) whose training-mode call on channels-last inputs
    uses `batch_norm_train`; other configurations (masks, `axis_name`, no scale/bias, another feature axis)
    fall back to `nnx.BatchNorm`.

    `names`: optional logical name of the channel dim (`(axes.NORM,)`, say), given to the scale, the bias and the
    running statistics; without it they carry no names.
    """

    def __init__(self, num_features: int, *, names=None, **kwargs):
        if names is not None:
            names = tuple(names)
            kwargs.update(scale_metadata=axes.param_metadata(names), bias_metadata=axes.param_metadata(names))
        super().__init__(num_features, **kwargs)
        if names is not None:
            self.mean = nnx.BatchStat(self.mean.get_value(), **axes.param_metadata(names))
            self.var = nnx.BatchStat(self.var.get_value(), **axes.param_metadata(names))

    def __call__(self, x, use_running_average=None, *, mask=None):
        use_running_average = (self.use_running_average if use_running_average is None else use_running_average)
        plain = (use_running_average is None or use_running_average or mask is not None
                 or self.axis_name is not None or self.scale is None or self.bias is None
                 or self.use_fast_variance or self.axis not in (-1, x.ndim - 1))
        if plain:
            return super().__call__(x, use_running_average, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        stop = jax.lax.stop_gradient if (self.mean._can_update or self.var._can_update) else (lambda v: v)
        self.mean[...] = stop(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = stop(self.momentum * self.var[...] + (1 - self.momentum) * var)
        return y
