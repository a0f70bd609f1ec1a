"""Pallas flash attention: interpreter numerics (both reduction walks) against the reference, forward and backward;
lowering for TPU (Mosaic) and GPU (Pallas-Triton) at small and realistic shapes; block skipping; dispatch."""
import jax
import jax.extend
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxattn
from jaxattn.core import dispatch
from jaxattn.dot_product import common, reference
from jaxattn.kernels.common import bands
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common.verify import with_vjp
from jaxattn.kernels.flash_attention import blocks, pallas
from jaxattn.kernels.flash_attention.blocks import BlockSizes
from jaxattn.kernels.flash_attention.tile import Problem
from jaxattn.testing import assert_lowers, assert_matches_reference, random_inputs
from jaxattn.testing.lowering import pallas_call_outputs

SMALL = BlockSizes.uniform(16, 16)  # several blocks per axis at interpreter-friendly lengths


def _segments(b, length, parts=3):
    return (jnp.arange(length)[None] * parts // length).repeat(b, 0).astype(jnp.int32)


def _case(b, t, s, n, k, h, hv=None, *, bias=None, causal=False, window=None, segments=False, outputs="both",
          reduction="fori", sizes=SMALL):
    """(impl, reference, inputs, names) for one configuration; `outputs` picks what the VJP sees. The 'grid'
    walk (TPU's) runs in Mosaic's TPU simulator, whose uninitialised memory is NaN, the 'fori' walk (Triton's)
    in the generic interpreter."""
    target = "tpu_interpret" if reduction == "grid" else "interpret"
    shapes = [(b, t, n, h), (b, s, k, h), (b, s, k, hv or h)] + ([bias] if bias else [])
    inputs = random_inputs(0, shapes)
    q_seg, k_seg = (_segments(b, t), _segments(b, s)) if segments else (None, None)
    spec = common.MaskSpec(causal, window, s - t)
    pick = {"both": lambda r: r, "out": lambda r: r[0], "lse": lambda r: r[1]}[outputs]

    def impl(q, kk, v, *bias_):
        return pick(pallas.flash_attention(q, kk, v, *bias_, q_segment_ids=q_seg, k_segment_ids=k_seg,
                                           is_causal=causal, window=window, target=target, block_sizes=sizes,
                                           reduction=reduction))

    @jax.jit
    def ref(q, kk, v, *bias_):
        return pick(reference.attention_reference(q, kk, v, bias_[0] if bias_ else None, None, q_seg, k_seg,
                                                  scale=h ** -0.5, spec=spec))

    return impl, ref, inputs, ["query", "key", "value", "bias"]


# (dims B, T, S, N, K, H[, Hv]), options. Odd lengths, T != S, GQA and a padded tail everywhere.
CASES = {
    "plain_gqa": ((1, 37, 50, 4, 2, 16), {}),
    "causal_window_segments_bias_b11s": ((2, 37, 50, 4, 2, 16), dict(causal=True, window=(7, 0), segments=True,
                                                                      bias=(2, 1, 1, 50))),
    "window_t_gt_s_empty_rows_bias_1nts": ((1, 50, 37, 2, 1, 16), dict(window=(5, 3), bias=(1, 2, 50, 37))),
    "decode_t1_hv_ne_h_lse_only": ((1, 1, 77, 4, 1, 16, 24), dict(causal=True, outputs="lse")),
    "causal_full_bias_segments_out_only": ((2, 40, 40, 4, 4, 16), dict(causal=True, bias=(2, 4, 40, 40),
                                                                       segments=True, outputs="out")),
    # Whole query blocks above the diagonal see no key: their dlogits blocks must still be written (zeros).
    "empty_query_blocks_bias": ((1, 64, 16, 2, 1, 16), dict(causal=True, bias=(1, 2, 64, 16))),
}
GRID_CASES = ("causal_window_segments_bias_b11s", "empty_query_blocks_bias", "decode_t1_hv_ne_h_lse_only")
BF16_CASES = (("fori", "causal_full_bias_segments_out_only"), ("grid", "causal_window_segments_bias_b11s"))


@pytest.mark.parametrize("reduction,name,dtype", (
    [("fori", name, jnp.float32) for name in CASES]
    + [("grid", name, jnp.float32) for name in GRID_CASES]
    + [(red, name, jnp.bfloat16) for red, name in BF16_CASES]))
def test_pallas_matches_reference(reduction, name, dtype):
    dims, opts = CASES[name]
    impl, ref, inputs, names = _case(*dims, reduction=reduction, **opts)
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=names)


def test_through_the_op_api_with_uneven_blocks():
    """implementation='pallas' from `dot_product_attention`, default interpreter blocks (one big tile) and a
    different tile per kernel, a scale and a symmetric int window."""
    q, k, v = random_inputs(3, [(1, 20, 2, 8), (1, 24, 2, 8), (1, 24, 2, 8)])
    kw = dict(scale=0.3, local_window_size=6, return_lse=True)
    out = jaxattn.dot_product_attention(q, k, v, implementation="pallas", **kw)
    want = jaxattn.dot_product_attention(q, k, v, implementation="reference", **kw)
    for a, r in zip(out, want):
        assert jnp.allclose(a, r, atol=2e-5, rtol=2e-5)
    sizes = BlockSizes(16, 16, 32, 16, 16, 32)
    impl, ref, inputs, names = _case(1, 20, 24, 2, 2, 8, causal=True, sizes=sizes)
    assert_matches_reference(impl, ref, inputs, names=names)


def test_constant_bias_builds_no_dbias():
    """A bias that is not differentiated (e.g. a mask as -inf bias) costs no dlogits buffer in the backward."""
    q, k, v, bias = random_inputs(0, [(1, 32, 2, 16), (1, 32, 2, 16), (1, 32, 2, 16), (1, 2, 32, 32)])

    def loss(q, k, v, bias):
        return pallas.flash_attention(q, k, v, bias, target="tpu")[0].sum()  # traced only, never lowered

    def dq_outputs(argnums):
        (outputs,) = pallas_call_outputs(jax.grad(loss, argnums=argnums), *(q, k, v, bias), name="flash_attention_dq")
        return outputs

    assert dq_outputs(0) == 1
    assert dq_outputs((0, 3)) == 2



# ---- lowering: fwd + bwd kernels for TPU (grid walk) and GPU (Pallas-Triton, fori walk), nothing runs ----

def _lowering_args(b, t, s, n, k, h, dtype, bias, segments):
    sds = jax.ShapeDtypeStruct
    args = [sds((b, t, n, h), dtype), sds((b, s, k, h), dtype), sds((b, s, k, h), dtype)]
    if bias:
        args.append(sds(bias, jnp.float32))
    if segments:
        args += [sds((b, t), jnp.int32), sds((b, s), jnp.int32)]
    cotangents = (sds((b, t, n, h), dtype), sds((b, n, t), jnp.float32))
    return args, cotangents


LOWERING = {
    "realistic_causal_gqa": ((1, 8192, 8192, 8, 2, 128), dict(is_causal=True)),
    "realistic_window_bias_segments": ((1, 8192, 8192, 4, 4, 128), dict(is_causal=True, window=(1024, 0),
                                                                        bias=(1, 4, 8192, 8192), segments=True)),
    "small_decode_odd_head": ((2, 1, 77, 4, 1, 80), dict(window=(3, 3), bias=(1, 1, 1, 77), segments=True)),
}


@pytest.mark.parametrize("target", ["tpu", "triton"])
@pytest.mark.parametrize("name", list(LOWERING))
def test_lowers_forward_and_backward(target, name):
    dims, opts = LOWERING[name]
    opts = dict(opts)
    bias, segments = opts.pop("bias", None), opts.pop("segments", False)
    args, cotangents = _lowering_args(*dims, jnp.bfloat16, bias, segments)
    diff = 4 if bias else 3

    def fn(q, k, v, *rest):
        b = rest[0] if bias else None
        q_seg, k_seg = rest[-2:] if segments else (None, None)
        return pallas.flash_attention(q, k, v, b, q_segment_ids=q_seg, k_segment_ids=k_seg, target=target, **opts)

    text = assert_lowers(with_vjp(fn, range(diff)), *args, cotangents, targets=(target,))[target]
    call = "tpu_custom_call" if target == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(call) == 3  # forward, dk/dv, dq (+ dbias) kernels


def test_window_grid_visits_only_the_band():
    """On TPU the reduction axis of a windowed call spans the band, not the sequence (blocks outside are never
    visited), and in the fori walk the loop bounds come from the same band."""
    problem = Problem.of(8192, 8192, 128, is_causal=True, window=(1024, 0))
    sizes = blocks.fit("tpu", 8192, 8192)
    assert problem.max_kv_blocks(sizes.block_q, sizes.block_k, 8192 // sizes.block_k) == 4  # (512 + 1024) / 512 + 1
    assert problem.max_kv_blocks(512, 512, 16) == 4
    causal = Problem.of(8192, 8192, 128, is_causal=True)
    assert [causal.kv_blocks(i, 512, 512, 16) for i in (0, 7)] == [(0, 1), (0, 8)]
    assert problem.kv_blocks(7, 512, 512, 16) == (5, 8)


# ---- band and block arithmetic (pure Python): never skip a visible key, never visit an invisible block ----

@given(start=st.integers(0, 200), size=st.sampled_from([1, 8, 16, 32]), block=st.sampled_from([1, 8, 16, 32]),
       num=st.integers(1, 12), lower=st.one_of(st.none(), st.integers(-80, 80)),
       width=st.one_of(st.none(), st.integers(0, 80)))
def test_block_range_is_exact(start, size, block, num, lower, width):
    upper = None if width is None else (lower if lower is not None else 0) + width
    first, stop = bands.block_range(start, size, lower, upper, block, num)
    visible = {j // block for i in range(start, start + size) for j in range(num * block)
               if (lower is None or j - i >= lower) and (upper is None or j - i <= upper)}
    assert set(range(first, stop)) == visible or (not visible and stop == first)
    if lower is not None and upper is not None and start % size == 0:
        assert stop - first <= bands.max_blocks(size, lower, upper, block, num)
    row_lower, row_upper = bands.transpose_band(lower, upper)
    assert (row_lower is None) == (upper is None) and (row_upper is None) == (lower is None)


@given(length=st.integers(1, 5000), target=st.sampled_from(["tpu", "triton", "interpret"]))
def test_fitted_blocks_share_one_padding(length, target):
    sizes = blocks.fit(target, length, length)
    tp, sp = blocks.padded_lengths(sizes, length, length)
    assert tp >= length and sp >= length
    assert all(tp % b == 0 for b in sizes.q_blocks) and all(sp % b == 0 for b in sizes.k_blocks)
    if target == "triton":
        assert all(b >= 16 and b & (b - 1) == 0 for b in sizes.q_blocks + sizes.k_blocks)
    if target == "tpu":
        assert all(b % 16 == 0 for b in sizes.q_blocks)
        assert all(b % 128 == 0 for b in sizes.k_blocks)
    assert common_blocks.feature_dim(80, "triton") == 128


# ---- dispatch ----

def test_dispatch_picks_kernels_per_platform(monkeypatch):
    q = jnp.zeros((1, 8, 2, 16))
    args = dict(query=q, key=q, value=q, bias=None, mask=None, spec=None, segment_ids=False)
    op = "dot_product_attention"

    def chosen(**kw):
        return {p: (c.backend, c.target) for p, c in dispatch.plan(op, None, **{**args, **kw}).items()}

    monkeypatch.setattr(dispatch, "module_available", lambda name: name == "jax_triton")
    assert chosen() == {"cpu": ("xla", None), "tpu": ("pallas", "tpu"), "cuda": ("triton", None),
                        "rocm": ("triton", None)}
    assert set(chosen(mask=jnp.ones((8, 8), bool)).values()) == {("xla", None)}
    monkeypatch.setattr(dispatch, "module_available", lambda name: False)
    assert chosen()["cuda"] == ("pallas", "triton")  # no jax-triton: Pallas-Triton
    assert dispatch.resolve(op, None, platform="tpu", **args).func is pallas.attention


def test_mask_is_refused_by_name():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="does not support"):
        jaxattn.dot_product_attention(q, q, q, mask=jnp.ones((8, 8), bool), implementation="pallas")
    with pytest.raises(ValueError, match="mask"):
        pallas.attention(q, q, q, None, jnp.ones((8, 8), bool), None, None, scale=1.0,
                         spec=common.MaskSpec())


def test_bad_kernel_arguments_raise():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="target"):
        pallas.flash_attention(q, q, q, target="cuda")
    with pytest.raises(ValueError, match="reduction"):
        pallas.flash_attention(q, q, q, target="interpret", reduction="scan")
    with pytest.raises(ValueError, match="segment"):
        pallas.flash_attention(q, q, q, q_segment_ids=jnp.zeros((1, 8), jnp.int32), target="interpret")

