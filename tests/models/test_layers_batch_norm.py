"""`batch_norm_train` / `BatchNormVJP` (hand-written BatchNorm backward) against autodiff of the plain formula and
against `nnx.BatchNorm` (outputs, running statistics, gradients, eval mode)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxattn.models.layers.batch_norm import BatchNormVJP, batch_norm_train
from jaxattn.testing import assert_matches_reference, random_inputs

EPS = 1e-3


def _plain(x, scale, bias):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes)
    var = jnp.square(xf - mean).mean(axes)
    y = (xf - mean) * (jax.lax.rsqrt(var + EPS) * scale) + bias
    return y, mean, var


@pytest.mark.parametrize("shape,dtype", [((2, 5, 3, 4), jnp.float32), ((1, 1, 1, 3), jnp.float32),
                                         ((7, 6), jnp.float32), ((2, 5, 3, 4), jnp.bfloat16)])
def test_batch_norm_train_matches_autodiff(shape, dtype):
    x, scale, bias = random_inputs(0, [shape, shape[-1:], shape[-1:]])
    x = x * 3.0 + 1.5  # |mean| ~ std: the centred form matters
    # All three outputs get random cotangents, so the mean/variance terms of the backward are checked too.
    assert_matches_reference(lambda x, s, b: batch_norm_train(x, s, b, EPS), _plain, [x, scale, bias],
                             dtype=dtype, names=["x", "scale", "bias"])


def test_batch_norm_train_check_grads():
    x, scale, bias = random_inputs(1, [(3, 4, 2), (2,), (2,)])
    check_grads(lambda x, s, b: batch_norm_train(x, s, b, EPS), (x, scale, bias), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_matches_nnx_batch_norm(dtype):
    kw = dict(momentum=0.9, epsilon=EPS, use_fast_variance=False, dtype=dtype)
    plain, fast = nnx.BatchNorm(5, **kw, rngs=nnx.Rngs(0)), BatchNormVJP(5, **kw, rngs=nnx.Rngs(0))
    fast.scale[...] = plain.scale[...] = jnp.linspace(0.5, 2.0, 5)
    fast.bias[...] = plain.bias[...] = jnp.linspace(-1.0, 1.0, 5)
    x = random_inputs(2, [(2, 4, 3, 5)])[0] * 2.0 + 1.0

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x).astype(jnp.float32)))

    tol = 1e-5 if dtype is None else 2e-2
    for _ in range(2):  # twice: running statistics accumulate the same way
        (l_plain, g_plain), (l_fast, g_fast) = (nnx.value_and_grad(loss, argnums=(0, 1))(m, x)
                                                for m in (plain, fast))
        np.testing.assert_allclose(l_fast, l_plain, rtol=tol, atol=tol)
        for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
        for name in ("mean", "var"):
            np.testing.assert_allclose(getattr(fast, name)[...], getattr(plain, name)[...], rtol=1e-6, atol=1e-6)
    plain.eval(), fast.eval()
    np.testing.assert_allclose(np.asarray(fast(x), np.float32), np.asarray(plain(x), np.float32), rtol=tol,
                               atol=tol)
    assert jax.tree.structure(nnx.state(fast)) == jax.tree.structure(nnx.state(plain))
