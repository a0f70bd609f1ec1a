"""Pallas lightning attention: interpreter numerics (both block walks) against the op's reference, forward and
backward (dq, dk, dv, d initial_state); the VJP algebra over a dense scan (hypothesis); lowering for TPU (Mosaic)
and GPU (Pallas-Triton) at small and realistic shapes; block fitting; dispatch; bad arguments."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxattn
from jaxattn.core import dispatch
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common.verify import with_vjp
from jaxattn.kernels.lightning_attention import blocks, pallas, vjp
from jaxattn.kernels.lightning_attention.blocks import BlockSizes
from jaxattn.lightning.reference import decay_weights, lightning_reference
from jaxattn.testing import assert_lowers, assert_matches_reference

F32, BF16 = jnp.float32, jnp.bfloat16
NAMES = ["query", "key", "value", "initial_state"]


def _inputs(seed, b, t, n, h, hv, *, init):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, t, n, h), (b, t, n, hv)] + ([(b, n, h, hv)] if init else [])
    return [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]


def _slopes(kind, n):
    """None, TransNormerLLM's ALiBi slopes, or extremes: no decay on one head, a fast decay (lambda^16 ~ 1e-28)
    on the other, so products of block factors underflow."""
    return {"none": None, "alibi": jaxattn.lightning_slopes(n),
            "extreme": jnp.asarray([0.0, 4.0] * (n // 2), F32)}[kind]


def _documents(b, t):
    """Packed documents: starts inside a block, on a block edge (16) and a single-token document; row 1 has one
    document (its segment id is not 0)."""
    ids = np.zeros((b, t), np.int32)
    ids[0, 5:], ids[0, 16:], ids[0, 17:] = 1, 2, 3
    ids[1:] = 9
    return jnp.asarray(ids)


def _case(dims, *, slopes="alibi", causal=True, init=True, outputs="both", reduction="fori", block=16,
          documents=False):
    """(impl, reference, inputs) for one configuration. The 'grid' walk (TPU's) runs in Mosaic's TPU simulator
    (uninitialised memory is NaN), the 'fori' walk (Pallas-Triton's) in the generic interpreter."""
    b, t, n, h, hv = dims
    target = "tpu_interpret" if reduction == "grid" else "interpret"
    sl = _slopes(slopes, n)
    inputs = _inputs(t, b, t, n, h, hv, init=init and causal)
    pick = {"both": lambda r: r, "out": lambda r: r[0], "state": lambda r: r[1]}[outputs if causal else "out"]
    ids = _documents(b, t) if documents else None

    def impl(q, k, v, *s0):
        return pick(pallas.lightning_attention(q, k, v, sl, initial_state=s0[0] if s0 else None, is_causal=causal,
                                               segment_ids=ids, target=target, block_sizes=BlockSizes(block),
                                               reduction=reduction))

    def ref(q, k, v, *s0):
        return pick(lightning_reference(q, k, v, sl, s0[0] if s0 else None, is_causal=causal, segment_ids=ids))

    return impl, ref, inputs


# (B, T, N, H, Hv), options. Odd lengths (a partial last block), H != Hv, length 1, exact multiples.
CASES = {
    "decay_extreme_init_odd_t": ((2, 37, 2, 16, 24), dict(slopes="extreme")),
    "no_decay_init_t130_block32": ((1, 130, 2, 16, 16), dict(slopes="none", block=32)),
    "t1_state_only": ((1, 1, 2, 16, 8), dict(init=False, outputs="state")),
    "alibi_out_only_whole_blocks": ((1, 64, 2, 8, 16), dict(init=False, outputs="out", block=32)),
    "bidirectional_decay": ((1, 37, 2, 16, 24), dict(causal=False)),
    "documents_decay_init": ((2, 37, 2, 16, 24), dict(documents=True)),
    "documents_bidirectional_no_decay": ((2, 37, 2, 16, 8), dict(causal=False, slopes="none", documents=True)),
}
RUNS = ([("fori", name, F32) for name in CASES]
        + [("fori", "no_decay_init_t130_block32", BF16), ("fori", "bidirectional_decay", BF16),
           ("grid", "decay_extreme_init_odd_t", F32), ("grid", "alibi_out_only_whole_blocks", BF16),
           ("grid", "bidirectional_decay", F32), ("grid", "documents_decay_init", F32),
           ("fori", "documents_decay_init", BF16)])


@pytest.mark.parametrize("reduction,name,dtype", RUNS)
def test_pallas_matches_reference(reduction, name, dtype):
    dims, opts = CASES[name]
    impl, ref, inputs = _case(dims, reduction=reduction, **opts)
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=NAMES)


def test_through_the_op_api():
    """implementation='pallas' from `lightning_attention` (default interpreter blocks), return_state, and the
    bidirectional form without decay (plain XLA inside the backend)."""
    q, k, v, s0 = _inputs(3, 1, 20, 2, 8, 12, init=True)
    slopes = jaxattn.lightning_slopes(2)
    for kw in (dict(slopes=slopes, initial_state=s0, return_state=True), dict(is_causal=False)):
        out = jaxattn.lightning_attention(q, k, v, implementation="pallas", **kw)
        want = jaxattn.lightning_attention(q, k, v, implementation="reference", **kw)
        for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, r, atol=2e-5 * float(jnp.max(jnp.abs(r))), rtol=0)


# ---- the VJP algebra of vjp.py over a dense scan (no kernels): any shapes, cheap ----

def _dense_scan(a, b, c, slopes, init, docs, static, *, reverse, want_state, out_dtype=None):
    """The scan of `vjp.py`'s docstring, written densely on heads-last arrays (one document)."""
    del static
    assert docs is None
    _, t, n, _ = a.shape

    def power(x):  # lambda^x per head: [N, *x.shape]
        return jnp.broadcast_to(decay_weights(slopes, x), (n,) + x.shape)

    pos = jnp.arange(t, dtype=F32)
    dist = (pos[None, :] - pos[:, None]) if reverse else (pos[:, None] - pos[None, :])
    w = jnp.where(dist >= 0, power(jnp.maximum(dist, 0.0)), 0.0)
    a, b, c = (x.astype(F32) for x in (a, b, c))
    out = jnp.einsum("btnh,bsnh,nts,bsne->btne", a, b, w, c)
    # Decay of the initial state seen by row t, and weight of row s in the final state.
    init_pow, end_pow = (t - 1 - pos, pos) if reverse else (pos + 1, t - 1 - pos)
    state = jnp.einsum("bsnh,ns,bsne->bnhe", b, power(end_pow), c)
    if init is not None:
        out = out + jnp.einsum("btnh,bnhe,nt->btne", a, init, power(init_pow))
        state = state + init * power(jnp.asarray(float(t - 1 if reverse else t)))[None, :, None, None]
    return out.astype(out_dtype or c.dtype), (state if want_state else None)


_DENSE_CAUSAL = vjp.causal_lightning(_dense_scan)
_DENSE_BIDIRECTIONAL = vjp.bidirectional_lightning(_dense_scan)


@functools.lru_cache(maxsize=None)
def _dense_fns(causal, decay, init):
    slopes = jaxattn.lightning_slopes(2) if decay else None

    def impl(q, k, v, *s0):
        if causal:
            return _DENSE_CAUSAL(q, k, v, slopes, s0[0] if init else None, None, None)
        return _DENSE_BIDIRECTIONAL(q, k, v, slopes, None, None)

    def ref(q, k, v, *s0):
        out, state = lightning_reference(q, k, v, slopes, s0[0] if init else None, is_causal=causal)
        return (out, state) if causal else out

    return impl, ref


@settings(max_examples=6)  # each example compiles its own shapes; the kernels' own cases are above
@given(t=st.integers(1, 9), h=st.integers(1, 5), hv=st.integers(1, 5), causal=st.booleans(),
       decay=st.booleans(), init=st.booleans())
def test_vjp_algebra_over_a_dense_scan(t, h, hv, causal, decay, init):
    """dq/dk/dv/d initial_state as three scans (and the bidirectional form as two) equal the reference's autodiff
    for any shape; the kernels are then checked as scans above."""
    decay = decay or not causal  # bidirectional without decay never reaches the scans
    init = init and causal
    impl, ref = _dense_fns(causal, decay, init)
    assert_matches_reference(impl, ref, _inputs(t, 1, t, 2, h, hv, init=init), names=NAMES)


# ---- lowering: forward + backward kernels for TPU (grid walk) and GPU (Pallas-Triton, fori walk), nothing runs ----

LOWERING = {
    # 1 scan forward + 3 backward.
    "realistic_causal_decay_init": ((1, 8192, 8, 128, 128), dict(slopes=True, init=True), 4),
    "small_odd_t_odd_heads_no_decay": ((2, 130, 3, 96, 192), dict(slopes=False, init=True), 4),
    # 2 scans forward + 3 x 2 backward.
    "realistic_bidirectional_decay": ((1, 8192, 4, 128, 128), dict(slopes=True, causal=False), 8),
    # Packed documents: the per-row masks and the ids as a row ride along in every scan.
    "realistic_documents_decay_init": ((2, 8192, 4, 128, 128), dict(slopes=True, init=True, documents=True), 4),
}


@pytest.mark.parametrize("target", ["tpu", "triton"])
@pytest.mark.parametrize("name", list(LOWERING))
def test_lowers_forward_and_backward(target, name):
    (b, t, n, h, hv), opts, kernels = LOWERING[name]
    causal = opts.get("causal", True)
    slopes = jaxattn.lightning_slopes(n) if opts["slopes"] else None
    sds = jax.ShapeDtypeStruct
    args = [sds((b, t, n, h), BF16), sds((b, t, n, h), BF16), sds((b, t, n, hv), BF16)]
    if causal:
        args.append(sds((b, n, h, hv), F32))
        cotangents = (sds((b, t, n, hv), BF16), sds((b, n, h, hv), F32))
    else:
        cotangents = sds((b, t, n, hv), BF16)

    ids = jnp.asarray(np.arange(b * t).reshape(b, t) // 1000, jnp.int32) if opts.get("documents") else None

    def fn(q, k, v, *s0):
        out, state = pallas.lightning_attention(q, k, v, slopes, initial_state=s0[0] if s0 else None,
                                                is_causal=causal, segment_ids=ids, target=target)
        return (out, state) if causal else out

    text = assert_lowers(with_vjp(fn, range(len(args))), *args, cotangents, targets=(target,))[target]
    assert text.count("tpu_custom_call" if target == "tpu" else "__gpu$xla.gpu.triton") == kernels


# ---- block fitting (pure Python) ----

@given(length=st.integers(1, 20000), target=st.sampled_from(["tpu", "tpu_interpret", "triton", "interpret"]),
       dim=st.integers(1, 300))
def test_fitted_blocks(length, target, dim):
    sizes = blocks.fit(target, length)
    tp = common_blocks.padded_length(length, sizes.block)
    assert tp >= length and tp % sizes.block == 0 and tp - length < sizes.block
    if target == "triton":
        assert sizes.block >= 16 and sizes.block & (sizes.block - 1) == 0
        width = blocks.feature_dim(dim, target)
        assert width >= max(16, dim) and width & (width - 1) == 0
        assert width % blocks.value_tile(sizes, width) == 0
    if target in ("tpu", "tpu_interpret"):
        assert sizes.block % 16 == 0 and blocks.feature_dim(dim, target) == dim
        assert blocks.value_tile(sizes, dim) == dim


# ---- dispatch and bad arguments ----

def test_dispatch_picks_kernels_per_platform(monkeypatch):
    q = jnp.zeros((1, 8, 2, 16))
    args = dict(query=q, key=q, value=q, is_causal=True)
    op = "lightning_attention"

    def chosen(**kw):
        return {p: (c.backend, c.target) for p, c in dispatch.plan(op, None, **{**args, **kw}).items()}

    monkeypatch.setattr(dispatch, "module_available", lambda name: name == "jax_triton")
    assert chosen() == {"cpu": ("xla", None), "tpu": ("pallas", "tpu"), "cuda": ("triton", None),
                        "rocm": ("triton", None)}
    assert chosen(value=jnp.zeros((1, 8, 2, 512)))["cuda"] == ("pallas", "triton")  # too wide for registers
    monkeypatch.setattr(dispatch, "module_available", lambda name: False)
    assert chosen()["cuda"] == ("pallas", "triton")  # no jax-triton: Pallas on GPU
    assert dispatch.resolve(op, None, platform="tpu", **args).func is pallas.attention


def test_bad_kernel_arguments_raise():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="target"):
        pallas.lightning_attention(q, q, q, target="cuda")
    with pytest.raises(ValueError, match="reduction"):
        pallas.lightning_attention(q, q, q, target="tpu", reduction="fori")
    with pytest.raises(ValueError, match="initial_state"):
        pallas.lightning_attention(q, q, q, initial_state=jnp.zeros((1, 2, 16, 16)), is_causal=False)
    with pytest.raises(ValueError, match="positive"):
        BlockSizes(0)
