"""CPU-friendly layer variants: `Dense` (2-D matmul form of nnx.Linear) and the shifted depthwise conv with a
hand-written VJP, against the plain formulations (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxattn.models.layers import DepthwiseConv2d, depthwise_conv2d, resolve_padding
from jaxattn.models.layers.dense import Dense, dense
from jaxattn.models.layers.depthwise_vjp import DepthwiseConv2dVJP, shifted_depthwise_conv2d
from jaxattn.testing import assert_matches_reference, random_inputs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_matches_dot(dtype, bias):
    x, w, b = random_inputs(0, [(2, 3, 5, 4), (4, 6), (6,)])

    def plain(x, w, b):
        return jnp.einsum("bhwi,io->bhwo", x, w) + (b if bias else 0)

    assert_matches_reference(lambda x, w, b: dense(x, w, b if bias else None), plain, [x, w, b], dtype=dtype,
                             names=["x", "kernel", "bias"])


def test_dense_layer_is_linear():
    linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    layer = Dense(4, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 4))
    np.testing.assert_allclose(layer(x), linear(x), rtol=1e-6, atol=1e-6)
    assert layer.kernel.shape == linear.kernel.shape and layer.bias.shape == linear.bias.shape


CASES = [  # (x shape, kernel, stride, dilation, padding)
    ((2, 9, 7, 5), 3, 1, 1, "SAME"),
    ((2, 9, 8, 5), 3, 2, 1, "SAME"),
    ((1, 10, 11, 3), 5, 2, 2, "SAME"),
    ((2, 8, 8, 4), 3, 2, 1, "VALID"),
    ((1, 7, 7, 3), 3, 1, 1, ((2, 0), (0, 1))),
    ((1, 1, 1, 2), 3, 1, 1, "SAME"),
    ((2, 7, 9, 3), 3, 2, 1, "SAME"),  # odd sizes: the strided input gradient's phases and crop
    ((1, 11, 10, 2), 5, 3, 1, ((1, 2), (2, 0))),
    ((1, 6, 7, 2), 1, 2, 1, "VALID"),  # a phase that receives no tap
    ((1, 1, 1, 2), 3, 2, 1, "SAME"),
]


def _pads(shape, k, stride, dilation, padding):
    if isinstance(padding, str):
        return tuple(resolve_padding(padding, s, k, stride, dilation) for s in shape[1:3])
    return padding


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in CASES] + [(CASES[1], jnp.bfloat16),
                                                                           (CASES[2], jnp.bfloat16)])
def test_shifted_depthwise_vjp_matches_grouped_conv(case, dtype):
    shape, k, stride, dilation, padding = case
    x, w = random_inputs(0, [shape, (k, k, 1, shape[-1])])
    pads = _pads(shape, k, stride, dilation, padding)

    def grouped(x, w):
        return depthwise_conv2d(x, w, stride=stride, padding=pads, dilation=dilation, implementation="lax")

    def custom(x, w):
        return shifted_depthwise_conv2d(x, w, (stride, stride), pads, (dilation, dilation))

    assert_matches_reference(custom, grouped, [x, w], dtype=dtype, names=["x", "kernel"])


def test_shifted_depthwise_check_grads():
    x, w = random_inputs(1, [(1, 6, 5, 2), (3, 3, 1, 2)])
    f = lambda x, w: shifted_depthwise_conv2d(x, w, (2, 2), ((0, 1), (1, 1)), (1, 1))  # noqa: E731
    check_grads(f, (x, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_depthwise_layer_vjp_equals_layer():
    plain = DepthwiseConv2d(6, 3, stride=2, padding="SAME", rngs=nnx.Rngs(0))
    fast = DepthwiseConv2dVJP(6, 3, stride=2, padding="SAME", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 9, 10, 6))

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x)))

    grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    (v_fast, g_fast), (v_plain, g_plain) = grad(fast, x), grad(plain, x)
    np.testing.assert_allclose(v_fast, v_plain, rtol=1e-5)
    np.testing.assert_allclose(g_fast[1], g_plain[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_fast[0].kernel[...], g_plain[0].kernel[...], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_fast[0].bias[...], g_plain[0].bias[...], rtol=1e-4, atol=1e-4)
