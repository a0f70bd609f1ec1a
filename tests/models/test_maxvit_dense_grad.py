"""`DenseNNGrad` (MaxViT's attention/FFN Linear with the weight gradient as transpose + plain matmul on CPU) against
`Dense`: same parameters, outputs and gradients in fp32 and bf16, narrowing and widening layers, no bias; and that
the compiled backward of a narrowing layer has no dot contracting the token axis (XLA:CPU's slow TN form)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models.layers.dense import Dense
from jaxattn.models.layers.dense_weight_grad import DenseNNGrad, dense_nn_grad


@pytest.mark.parametrize("din, dout, use_bias, dtype", [
    (12, 5, True, None), (12, 5, True, jnp.bfloat16), (6, 6, False, None), (4, 9, True, None)])
def test_matches_dense(din, dout, use_bias, dtype):
    plain = Dense(din, dout, use_bias=use_bias, dtype=dtype, rngs=nnx.Rngs(0))
    fast = DenseNNGrad(din, dout, use_bias=use_bias, dtype=dtype, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(fast)) == jax.tree.structure(nnx.state(plain))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, din), dtype=np.float32))

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x).astype(jnp.float32)))

    (l_plain, g_plain), (l_fast, g_fast) = (jax.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(m, x)
                                            for m in (plain, fast))
    tol = 1e-5 if dtype is None else 2e-2
    np.testing.assert_allclose(l_fast, l_plain, rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_narrowing_weight_gradient_is_not_a_tn_dot():
    x, kernel = jnp.ones((64, 16)), jnp.ones((16, 4))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(dense_nn_grad(x, k) ** 2), argnums=(0, 1)))
    hlo = grad.lower(x, kernel).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == 3, dots
    assert not any("lhs_contracting_dims={0}" in line for line in dots), dots
