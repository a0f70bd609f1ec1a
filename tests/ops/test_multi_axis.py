"""MaxViT block and grid attention: timm partition order, reference vs XLA path (forward and gradients), edge tiles,
global-attention limits, bad inputs, and a hypothesis sweep over shapes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxattn
from jaxattn.core import image_tiles
from jaxattn.multi_axis import reference
from jaxattn.testing import assert_allclose, assert_matches_reference

OPS = {"block": jaxattn.block_attention, "grid": jaxattn.grid_attention}


def _inputs(seed, b, h, w, n, d, dv, tokens, bias=True):
    """q, k, v (and a bias) from numpy: no per-shape compile of a random kernel."""
    shapes = [(b, h, w, n, d), (b, h, w, n, d), (b, h, w, n, dv)] + ([(n, tokens, tokens)] if bias else [])
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes)


@pytest.mark.parametrize("tiling", ["block", "grid"])
def test_tilings_follow_timm_partition_order(tiling):
    x = jnp.arange(2 * 6 * 8 * 3, dtype=jnp.float32).reshape(2, 6, 8, 3)
    size = (3, 2)
    split, merge = ((image_tiles.to_windows, image_tiles.from_windows) if tiling == "block"
                    else (image_tiles.to_grid, image_tiles.from_grid))
    timm_split, _ = reference._PARTITIONS[tiling]
    tiles = split(x, size)
    np.testing.assert_array_equal(tiles.reshape(-1, 3, 2, 3), timm_split(x, size))
    np.testing.assert_array_equal(merge(tiles, size, (6, 8)), x)
    if tiling == "grid":  # tile (i, j) holds rows a*H/g + i: here the first tile is rows {0, 2, 4} x cols {0, 4}
        np.testing.assert_array_equal(tiles[0, 0, :, 0], x[0, ::2, ::4, 0].reshape(-1))


CASES = [  # (b, h, w, n, d, dv, size): non-square maps and tiles, value dim != head dim
    (2, 6, 8, 2, 4, 5, (3, 2)),
    (1, 4, 4, 1, 8, 8, 4),  # one tile covers the map
]


@pytest.mark.parametrize("tiling", ["block", "grid"])
@pytest.mark.parametrize("dtype, case", [(jnp.float32, CASES[0]), (jnp.bfloat16, CASES[0]), (jnp.float32, CASES[1])])
def test_matches_reference_with_bias(tiling, dtype, case):
    b, h, w, n, d, dv, size = case
    tokens = int(np.prod(image_tiles.tile_size("size", size)))
    op = OPS[tiling]
    impl = jax.jit(lambda q, k, v, bias: op(q, k, v, size, bias=bias))
    ref = jax.jit(lambda q, k, v, bias: op(q, k, v, size, bias=bias, implementation="reference"))
    assert_matches_reference(impl, ref, _inputs(1, b, h, w, n, d, dv, tokens), dtype=dtype,
                             names=["query", "key", "value", "bias"])


@pytest.mark.parametrize("tiling", ["block", "grid"])
def test_whole_map_tile_is_global_attention_and_unit_tile_copies_value(tiling):
    q, k, v, bias = _inputs(2, 2, 3, 5, 2, 4, 3, 15)
    op = OPS[tiling]
    flat = lambda x: x.reshape(2, 15, 2, -1)  # noqa: E731
    want = jaxattn.dot_product_attention(flat(q), flat(k), flat(v), bias[None], implementation="reference")
    assert_allclose(op(q, k, v, (3, 5), bias=bias), want.reshape(2, 3, 5, 2, 3))
    assert_allclose(op(q, k, v, 1), v)


def test_scale_argument():
    q, k, v = _inputs(3, 1, 4, 4, 2, 4, 4, 4, bias=False)
    got = jaxattn.block_attention(q, k, v, 2, scale=0.3)
    want = jaxattn.block_attention(q * (0.3 / 4 ** -0.5), k, v, 2)
    assert_allclose(got, want)


def test_reference_gradients_numerically():
    q, k, v, bias = _inputs(4, 1, 4, 2, 1, 3, 2, 4)
    for tiling in ("block", "grid"):
        f = functools.partial(reference.partition_attention_reference, partition=tiling, size=(2, 2), scale=0.5)
        check_grads(jax.jit(f), (q, k, v, bias), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    q, k, v, bias = _inputs(5, 1, 4, 6, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="`window_size`.*multiples|multiples.*`window_size`"):
        jaxattn.block_attention(q, k, v, 4)
    with pytest.raises(ValueError, match="`grid_size`"):
        jaxattn.grid_attention(q, k, v, (2, 4))
    with pytest.raises(ValueError, match="`bias`"):
        jaxattn.block_attention(q, k, v, 2, bias=jnp.zeros((2, 4, 9)))
    with pytest.raises(ValueError, match="`query` must have rank 5"):
        jaxattn.block_attention(q[0], k, v, 2)
    with pytest.raises(ValueError, match="`key` spatial size"):
        jaxattn.grid_attention(q, k[:, :2], v[:, :2], 2)
    with pytest.raises(ValueError, match="`key` head_dim"):
        jaxattn.block_attention(q, k[..., :3], v, 2)
    with pytest.raises(ValueError, match="`window_size`"):
        jaxattn.block_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="`implementation`"):
        jaxattn.block_attention(q, k, v, 2, implementation="cuda")


@settings(max_examples=6)
@given(st.sampled_from(["block", "grid"]), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(2, 3), st.integers(1, 2))
def test_property_shapes(tiling, th, tw, ph, pw, n):
    h, w = th * ph, tw * pw
    q, k, v, bias = _inputs(6, 1, h, w, n, 4, 3, ph * pw)
    both = jax.jit(lambda *a: (OPS[tiling](*a[:3], (ph, pw), bias=a[3]),
                               OPS[tiling](*a[:3], (ph, pw), bias=a[3], implementation="reference")))
    got, want = both(q, k, v, bias)
    assert got.shape == (1, h, w, n, 3)
    assert_allclose(got, want)
