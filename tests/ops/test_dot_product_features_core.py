"""The shared semantics of issue 16 in jaxattn.core: sink merge and gradient, soft-cap, per-head windows and the
block-sparse geometry (what the op, the kernels and context parallelism all import)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.core import block_sparse, masks, softmax


def _sink_attention(logits, values, sink):
    """Softmax over the keys plus one value-less sink column."""
    full = jnp.concatenate([logits, jnp.broadcast_to(sink, logits.shape[:-1] + (1,))], axis=-1)
    p = jax.nn.softmax(full, axis=-1)[..., :-1]
    return p @ values, jax.nn.logsumexp(full, axis=-1)


def test_merge_sink_equals_the_sink_column():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)
    sink = jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out, lse_total = softmax.merge_sink(jax.nn.softmax(logits, -1) @ values, lse, sink)
    want_out, want_lse = _sink_attention(logits, values, sink[..., None])
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse_total, want_lse, rtol=1e-5)


def test_merge_sink_after_merging_partials_counts_it_once():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    sink = jnp.float32(0.7)
    parts = [(jax.nn.softmax(l, -1) @ v, jax.nn.logsumexp(l, -1))
             for l, v in ((logits[:, :6], values[:6]), (logits[:, 6:], values[6:]))]
    out, lse = softmax.merge_partials(*parts[0], *parts[1])
    out, lse = softmax.merge_sink(out, lse, sink)
    want_out, want_lse = _sink_attention(logits, values, sink)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)


def test_merge_sink_of_an_empty_row_is_zero_with_lse_the_sink():
    out, lse = softmax.merge_sink(jnp.zeros((2, 3)), jnp.full((2,), -jnp.inf), jnp.float32(1.5))
    assert np.all(np.asarray(out) == 0) and np.allclose(lse, 1.5)


def test_sink_gradient_matches_autodiff():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    d_lse = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    sink = jnp.asarray([[0.3], [-1.2]], jnp.float32)  # one per "head" (leading axis)

    def loss(s):
        out, lse = _sink_attention(logits, values, s[..., None])
        return jnp.sum(out * d_out) + jnp.sum(lse * d_lse)

    out, lse = _sink_attention(logits, values, sink[..., None])
    delta = jnp.sum(out * d_out, axis=-1) - d_lse
    got = softmax.sink_gradient(sink, lse, delta, reduce_axes=(1,))
    np.testing.assert_allclose(got, jax.grad(loss)(sink)[:, 0], rtol=1e-5, atol=1e-6)


def test_soft_cap_and_its_derivative():
    x = jnp.linspace(-200.0, 200.0, 41)
    capped = softmax.soft_cap(x, 50.0)
    assert float(jnp.max(jnp.abs(capped))) < 50.0
    np.testing.assert_allclose(softmax.soft_cap_derivative(capped, 50.0),
                               jax.vmap(jax.grad(lambda v: softmax.soft_cap(v, 50.0)))(x), rtol=1e-5, atol=1e-6)
    assert softmax.soft_cap(x, None) is x


def test_per_head_windows():
    assert masks.per_head_windows([(1, 2), None, (0, 0)], 3, 4, 6) == ((1, 2), (10, 10), (0, 0))
    with pytest.raises(ValueError, match="one .* per query head: got 2 for 3"):
        masks.per_head_windows([(1, 2), (3, 4)], 3, 4, 4)
    with pytest.raises(ValueError, match=r"local_window_size\[1\]"):
        masks.per_head_windows([(1, 2), (-1, 4)], 2, 4, 4)
    left, right = masks.window_bounds(((1, 2), (3, 4)), (2, 1, 1))
    assert left.shape == (2, 1, 1) and list(np.asarray(right).ravel()) == [2, 4]
    mask = masks.position_mask(jnp.arange(4)[:, None], jnp.arange(6)[None, :], window=(left, right))
    assert mask.shape == (2, 4, 6) and bool(mask[0, 0, 2]) and not bool(mask[0, 0, 3]) and bool(mask[1, 0, 4])


def test_block_mask_geometry_and_visit_lists():
    assert block_sparse.grid_shape(130, 33, (16, 8)) == (9, 5)
    bm = jnp.asarray(np.random.default_rng(3).random((2, 1, 9, 5)) < 0.4)
    block_sparse.check_block_mask(bm, (16, 8), 2, 4, 130, 33)
    dense = block_sparse.expand(bm, (16, 8), 130, 33)
    assert dense.shape == (2, 1, 130, 33) and bool(dense[1, 0, 129, 32]) == bool(bm[1, 0, 8, 4])
    rows = block_sparse.rows_of_key_block(bm, (16, 8), jnp.arange(130), 3)
    np.testing.assert_array_equal(rows, dense[..., 3 * 8])
    indices, counts = block_sparse.visit_lists(bm)
    for b in range(2):
        for i in range(9):
            c = int(counts[b, 0, i])
            np.testing.assert_array_equal(indices[b, 0, i, :c], np.flatnonzero(np.asarray(bm[b, 0, i])))
    assert abs(block_sparse.density(bm) - float(np.mean(np.asarray(bm)))) < 1e-7


@pytest.mark.parametrize("bad,match", [
    (jnp.ones((1, 1, 9, 5), jnp.int32), "must be boolean"),
    (jnp.ones((1, 1, 8, 5), bool), r"\(1, 1, 8, 5\) does not match .*9, 5"),
    (jnp.ones((3, 1, 9, 5), bool), "does not match"),
    (jnp.ones((9, 5), bool), "does not match"),
])
def test_block_mask_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        block_sparse.check_block_mask(bad, (16, 8), 2, 4, 130, 33)
    with pytest.raises(ValueError, match="block_shape"):
        block_sparse.check_block_mask(jnp.ones((1, 1, 9, 5), bool), (16, 0), 2, 4, 130, 33)
