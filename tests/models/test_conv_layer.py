"""`layers.conv`: the matmul-form conv kernel gradient against `lax.conv_general_dilated` (values and all
gradients), and the dispatching drop-in."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn.models.layers.conv as conv_mod
from jaxattn.models.layers.conv import conv2d_matmul_grad, conv_general_dilated, conv_weight_grad
from jaxattn.testing import assert_matches_reference, random_inputs

NHWC = ("NHWC", "HWIO", "NHWC")

CASES = [  # (x shape, (kh, kw), out channels, stride, padding)
    ((2, 9, 7, 5), (3, 3), 6, (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 5), (3, 3), 4, (2, 2), ((1, 1), (1, 1))),  # torch-style symmetric padding, stride 2
    ((2, 9, 8, 5), (3, 3), 4, (2, 2), ((0, 1), (0, 1))),  # TF 'SAME' at stride 2 on an even size
    ((1, 11, 10, 3), (5, 5), 4, (2, 2), ((2, 2), (2, 2))),  # odd sizes, two taps per row phase
    ((2, 8, 9, 4), (3, 2), 3, (1, 2), ((0, 2), (1, 0))),  # non-square kernel, mixed strides, asymmetric pads
    ((1, 10, 10, 3), (3, 3), 2, (3, 3), ((1, 1), (1, 1))),  # stride 3: a phase with one tap, rows left over
    ((2, 6, 7, 3), (1, 1), 5, (2, 2), ((0, 0), (0, 0))),  # 1x1, strided
    ((1, 1, 1, 2), (3, 3), 3, (1, 1), ((1, 1), (1, 1))),  # 1x1 image
    ((2, 5, 5, 2), (3, 3), 3, (1, 1), ((0, 0), (0, 0))),  # VALID
]


def _lax(stride, padding):
    return lambda x, w: jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=NHWC)


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in CASES] + [(CASES[1], jnp.bfloat16),
                                                                           (CASES[3], jnp.bfloat16)])
def test_matmul_grad_conv_matches_lax(case, dtype):
    shape, kernel_hw, out, stride, padding = case
    x, w = random_inputs(0, [shape, (*kernel_hw, shape[-1], out)])
    assert_matches_reference(lambda x, w: conv2d_matmul_grad(x, w, stride, padding), _lax(stride, padding),
                             [x, w], dtype=dtype, names=["x", "kernel"])


def test_weight_grad_matches_lax_transpose():
    x, g = random_inputs(1, [(3, 13, 12, 4), (3, 7, 6, 5)])
    stride, padding = (2, 2), ((1, 1), (1, 1))
    _, vjp = jax.vjp(lambda w: _lax(stride, padding)(x, w), jnp.zeros((3, 3, 4, 5)))
    np.testing.assert_allclose(conv_weight_grad(x, g, (3, 3), stride, padding), vjp(g)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def always_fast(monkeypatch):
    monkeypatch.setattr(conv_mod, "MIN_OUT_PIXELS", 1)
    monkeypatch.setattr(conv_mod, "MIN_CHANNEL_PRODUCT", 1)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 1))])
def test_drop_in_resolves_padding_like_lax(always_fast, padding):
    x, w = random_inputs(2, [(2, 8, 9, 3), (3, 3, 3, 4)])
    assert_matches_reference(lambda x, w: conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=NHWC),
                             _lax((2, 2), padding), [x, w], names=["x", "kernel"])


@pytest.mark.parametrize("kwargs", [dict(feature_group_count=2), dict(rhs_dilation=(2, 2)),
                                    dict(lhs_dilation=(2, 1))])
def test_drop_in_falls_back_to_lax(always_fast, kwargs):
    groups = kwargs.get("feature_group_count", 1)
    x, w = random_inputs(3, [(1, 9, 9, 4), (3, 3, 4 // groups, 6)])

    def run(fn):
        return lambda x, w: fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, **kwargs)

    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: run(conv_general_dilated)(x, w).sum(), 1))(x, w))
    assert "custom_vjp" not in jaxpr
    assert_matches_reference(run(conv_general_dilated), run(jax.lax.conv_general_dilated), [x, w])


def test_fast_path_only_where_it_pays():
    def takes_fast_path(x_shape, kernel_shape):  # staged (for CPU lowerings) on any host
        x, w = jnp.zeros(x_shape), jnp.zeros(kernel_shape)
        return "custom_vjp" in str(jax.make_jaxpr(
            lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC))(x, w))

    assert takes_fast_path((1, 128, 128, 32), (3, 3, 32, 64))
    assert not takes_fast_path((1, 64, 64, 64), (3, 3, 64, 64))  # XLA's own gradient is faster there
    assert not takes_fast_path((1, 128, 128, 3), (3, 3, 3, 64))

