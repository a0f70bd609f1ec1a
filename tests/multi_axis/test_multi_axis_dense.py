"""The 'small_tiles' MaxViT block/grid attention (hand-written backward with explicit transposes) against the 'reference'
path: forward and gradients (q, k, v, bias), fp32 and bf16, odd tiles, broadcast and absent bias; the tile core
against autodiff of the plain formula and numerically; and that its backward dots keep their contracting dim
minor (no TN dot for XLA:CPU's Eigen fallback)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxattn
from jaxattn.multi_axis.dense import tile_attention
from jaxattn.testing import assert_matches_reference

OPS = {"block": jaxattn.block_attention, "grid": jaxattn.grid_attention}


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes)


@pytest.mark.parametrize("tiling", ["block", "grid"])
@pytest.mark.parametrize("dtype, case", [
    (jnp.float32, (2, 6, 8, 2, 4, 5, (3, 2), (2, 6, 6))),   # non-square map and tile, Dv != D
    (jnp.bfloat16, (2, 6, 8, 2, 4, 5, (3, 2), (2, 6, 6))),
    (jnp.float32, (1, 4, 4, 3, 8, 8, (1, 1), (1, 1, 1))),   # one-token tiles, bias broadcast over heads
    (jnp.float32, (1, 7, 7, 1, 8, 8, (7, 7), (49, 49))),    # one 49-token tile (MaxViT's), 2-D bias
])
def test_dense_matches_reference(tiling, dtype, case):
    b, h, w, n, d, dv, size, bias_shape = case
    op = OPS[tiling]
    inputs = _arrays(0, (b, h, w, n, d), (b, h, w, n, d), (b, h, w, n, dv), bias_shape)
    impl = lambda q, k, v, bias: op(q, k, v, size, bias=bias, implementation="small_tiles")  # noqa: E731
    ref = lambda q, k, v, bias: op(q, k, v, size, bias=bias, implementation="reference")  # noqa: E731
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=["query", "key", "value", "bias"])


def test_dense_without_bias_and_with_scale():
    q, k, v = _arrays(1, (2, 4, 6, 2, 4), (2, 4, 6, 2, 4), (2, 4, 6, 2, 3))
    impl = lambda q, k, v: jaxattn.grid_attention(q, k, v, 2, scale=0.3, implementation="small_tiles")  # noqa: E731
    ref = lambda q, k, v: jaxattn.grid_attention(q, k, v, 2, scale=0.3, implementation="reference")  # noqa: E731
    assert_matches_reference(impl, ref, (q, k, v), names=["query", "key", "value"])


def _plain(q, k, v, bias, scale):
    logits = jnp.einsum("gntd,gnsd->gnts", q * scale, k) + bias
    return jnp.einsum("gnts,gnsd->gntd", jax.nn.softmax(logits, axis=-1), v)


def test_tile_core_matches_autodiff_and_numerical_gradients():
    q, k, v, bias = _arrays(2, (3, 2, 5, 4), (3, 2, 5, 4), (3, 2, 5, 6), (2, 5, 5))
    assert_matches_reference(lambda *a: tile_attention(*a, 0.5), lambda *a: _plain(*a, 0.5), (q, k, v, bias),
                             names=["q", "k", "v", "bias"], rel_out=1e-6, rel_grad=1e-5)
    check_grads(lambda *a: tile_attention(*a, 0.5), (q, k, v, bias), order=1, modes=("rev",), atol=1e-2,
                rtol=1e-2)


def test_backward_dots_contract_the_minor_dim():
    q, k, v, bias = _arrays(3, (4, 2, 9, 8), (4, 2, 9, 8), (4, 2, 9, 8), (2, 9, 9))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(tile_attention(*a, 0.3) ** 2), argnums=(0, 1, 2, 3)))
    hlo = grad.lower(q, k, v, bias).compile().as_text()  # after XLA's passes, which fold plain transposes
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == 6, dots
    for line in dots:  # forward and backward: every lhs contracts its minor dim (3)
        assert "lhs_contracting_dims={3}" in line, line
