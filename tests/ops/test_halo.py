"""Halo attention: the pieces of timm's HaloAttn (rel-to-abs trick, unfold), reference vs XLA path (forward and
gradients, fp32/bf16, stride-2 queries, padding mask, halo > block, missing tables), bad inputs, hypothesis, and a
cross-check against timm itself when it is installed."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxattn
from jaxattn.halo import reference, relative, xla
from jaxattn.testing import assert_allclose, assert_matches_reference


def _randn(seed, *shapes):
    """Inputs from numpy: no per-shape compile of a random kernel."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes)


def _inputs(seed, b, h, w, n, d, dv, block, halo, stride=1):
    win = 2 * (block + 2 * halo) - 1
    return _randn(seed, (b, h // stride, w // stride, n, d), (b, h, w, n, d), (b, h, w, n, dv), (win, d), (win, d))


@pytest.mark.parametrize("bq, win", [(4, 10), (2, 8)])
def test_rel_to_abs_trick_is_an_offset_table(bq, win):
    q, rel = _randn(0, (3, bq, bq, 5), (2 * win - 1, 5))

    @jax.jit
    def both(q, rel):
        table = rel[relative.rel_offsets(bq, win)]  # [bq, win, D]: row j - i + win - 1
        shape = (3, bq, bq, win, win)
        want_w = jnp.einsum("byxd,xkd->byxk", q, table)[:, :, :, None, :]  # depends on (qx, kx) only
        want_h = jnp.einsum("byxd,ykd->byxk", q, table)[:, :, :, :, None]  # depends on (qy, ky) only
        got_w = reference.rel_logits_1d(q, rel, (0, 1, 3, 2, 4))
        got_h = reference.rel_logits_1d(q.transpose(0, 2, 1, 3), rel, (0, 3, 1, 4, 2))
        return got_w, jnp.broadcast_to(want_w, shape), got_h, jnp.broadcast_to(want_h, shape)

    got_w, want_w, got_h, want_h = both(q, rel)
    assert_allclose(got_w, want_w)
    assert_allclose(got_h, want_h)


@pytest.mark.parametrize("block, halo", [(4, 1), (2, 3)])
def test_halo_windows_match_timm_unfold(block, halo):
    (x,) = _randn(1, (2, 8, 12, 3, 2))
    got, want = jax.jit(lambda x: (xla.halo_windows(x, block, halo), reference._unfold(x, block, halo)))(x)
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2, 4), want)  # ours: [B, blocks, win*win, N, D]


CASES = {  # (h, w, n, d, dv, block, halo, stride, tables, mask_padding); hypothesis below covers the rest
    "halo3_nonsquare": (8, 12, 2, 4, 5, 4, 3, 1, "hw", False),
    "stride2_masked": (8, 8, 1, 8, 8, 4, 1, 2, "hw", True),
}


@pytest.mark.parametrize("name, dtype", [("halo3_nonsquare", jnp.float32), ("halo3_nonsquare", jnp.bfloat16),
                                         ("stride2_masked", jnp.float32)])
def test_matches_reference(name, dtype):
    h, w, n, d, dv, block, halo, stride, tables, mask = CASES[name]
    q, k, v, rh, rw = _inputs(2, 2, h, w, n, d, dv, block, halo, stride)

    def op(q, k, v, rh, rw, implementation=None):
        return jaxattn.halo_attention(
            q, k, v, block, halo, rel_height=rh if "h" in tables else None, rel_width=rw if "w" in tables else None,
            query_stride=stride, mask_padding=mask, implementation=implementation)

    impl = jax.jit(op)
    ref = jax.jit(functools.partial(op, implementation="reference"))
    assert_matches_reference(impl, ref, (q, k, v, rh, rw), dtype=dtype,
                             names=["query", "key", "value", "rel_height", "rel_width"])


def test_padding_mask_changes_only_border_blocks():
    @functools.partial(jax.jit, static_argnums=(0, 1))
    def timm_and_paper(block, halo, q, k, v):
        return tuple(jaxattn.halo_attention(q, k, v, block, halo, mask_padding=m) for m in (False, True))

    timm_style, paper_style = timm_and_paper(4, 2, *_inputs(3, 1, 8, 8, 1, 4, 4, 4, 2)[:3])
    assert not np.allclose(timm_style, paper_style)  # every 4x4 block of an 8x8 map touches the padding
    timm_style, paper_style = timm_and_paper(8, 0, *_inputs(3, 1, 8, 8, 1, 4, 4, 8, 0)[:3])
    assert_allclose(paper_style, timm_style)  # no halo, no padding


def test_reference_gradients_numerically():
    q, k, v, rh, rw = _inputs(4, 1, 4, 4, 1, 2, 2, 2, 1)
    f = functools.partial(reference.halo_attention_reference, block_size=2, halo_size=1, query_stride=1, scale=0.7,
                          mask_padding=False)
    check_grads(jax.jit(f), (q, k, v, rh, rw), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    q, k, v, rh, rw = _inputs(5, 1, 8, 8, 2, 4, 4, 4, 1)
    with pytest.raises(ValueError, match="`key` height and width .* multiples of `block_size`"):
        jaxattn.halo_attention(q[:, :6, :6], k[:, :6, :6], v[:, :6, :6], 4, 1)
    with pytest.raises(ValueError, match="`query` spatial size"):
        jaxattn.halo_attention(q, k, v, 4, 1, query_stride=2)
    with pytest.raises(ValueError, match="`rel_height` must have shape"):
        jaxattn.halo_attention(q, k, v, 4, 1, rel_height=rh[1:])
    with pytest.raises(ValueError, match="`block_size` .* multiple of `query_stride`"):
        jaxattn.halo_attention(q[:, :8:3, :8:3], k, v, 4, 1, query_stride=3)
    with pytest.raises(ValueError, match="`halo_size`"):
        jaxattn.halo_attention(q, k, v, 4, -1)
    with pytest.raises(ValueError, match="`value` spatial size"):
        jaxattn.halo_attention(q, k, v[:, :4], 4, 1)
    with pytest.raises(ValueError, match="one dtype"):
        jaxattn.halo_attention(q, k.astype(jnp.bfloat16), v, 4, 1)


@settings(max_examples=6)
@given(st.integers(1, 4), st.integers(0, 3), st.sampled_from([1, 2]), st.integers(1, 2), st.integers(1, 2),
       st.booleans(), st.sampled_from(["", "h", "w", "hw"]))
def test_property_shapes(block, halo, stride, nh, nw, mask, tables):
    stride = stride if block % stride == 0 else 1
    h, w = nh * block, nw * block
    q, k, v, rh, rw = _inputs(6, 1, h, w, 1, 4, 3, block, halo, stride)
    both = jax.jit(lambda *a: tuple(
        jaxattn.halo_attention(*a[:3], block, halo, rel_height=a[3] if "h" in tables else None,
                               rel_width=a[4] if "w" in tables else None, query_stride=stride,
                               mask_padding=mask, implementation=impl) for impl in ("xla", "reference")))
    got, want = both(q, k, v, rh, rw)
    assert got.shape == (1, h // stride, w // stride, 1, 3)
    assert_allclose(got, want)


def test_matches_timm_halo_attn_when_installed():
    """Cross-check with timm itself (optional: needs torch and timm, e.g. the `crosscheck` extra)."""
    halo_attn = pytest.importorskip("timm.layers.halo_attn")
    import torch
    torch.manual_seed(0)
    for stride in (1, 2):
        m = halo_attn.HaloAttn(32, 32, num_heads=2, block_size=4, halo_size=2, stride=stride).eval()
        x = torch.randn(2, 32, 8, 12)
        with torch.no_grad():
            want = m(x).permute(0, 2, 3, 1).numpy()
            q = m.q(x).permute(0, 2, 3, 1).numpy().reshape(2, 8 // stride, 12 // stride, 2, -1)
            kv = m.kv(x).permute(0, 2, 3, 1).numpy().reshape(2, 8, 12, 2, -1)  # per head: [k | v]
        dk = m.dim_head_qk
        got = jaxattn.halo_attention(q, kv[..., :dk], kv[..., dk:], 4, 2, query_stride=m.block_stride,
                                     rel_height=m.pos_embed.height_rel.detach().numpy(),
                                     rel_width=m.pos_embed.width_rel.detach().numpy())
        assert_allclose(np.asarray(got).reshape(want.shape), want, rel=1e-5)
