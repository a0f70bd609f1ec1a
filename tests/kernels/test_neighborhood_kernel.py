"""Pallas neighborhood attention: interpreter numerics (both reduction walks) against the op's reference, forward
and backward (out, lse, dq, dk, dv, d rpb), fp32 and bf16; halo walks never miss a window key (numpy, hypothesis);
lowering for TPU (Mosaic) and GPU (Pallas-Triton) at realistic and small shapes; dispatch."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxattn
from jaxattn.core import dispatch
from jaxattn.kernels.common.verify import with_vjp
from jaxattn.kernels.neighborhood_attention import blocks, pallas
from jaxattn.kernels.neighborhood_attention.geometry import Geometry, Walk
from jaxattn.core import neighborhood_windows as windows
from jaxattn.testing import assert_allclose, assert_lowers, assert_matches_reference, random_inputs
from jaxattn.testing.lowering import pallas_call_outputs

OP = "neighborhood_attention"


def _per_axis(x, nd):
    return tuple(x) if isinstance(x, tuple) else (x,) * nd


def _spec(nd, kernel, dilation=1, stride=1, causal=False):
    return windows.NASpec(_per_axis(kernel, nd), _per_axis(dilation, nd), _per_axis(stride, nd),
                          _per_axis(causal, nd))


def _case(spatial, kernel, *, dilation=1, stride=1, causal=False, rpb=False, heads=(2, 1), dims=(8, 8),
          tiles=None, reduction="fori"):
    """(impl, reference, inputs): the kernel in an interpreter ('grid' walk: Mosaic's TPU simulator, whose
    uninitialised memory is NaN; 'fori': the generic interpreter) against `implementation='reference'`."""
    nd = len(spatial)
    spec = _spec(nd, kernel, dilation, stride, causal)
    (n, k), (h, hv) = heads, dims
    shapes = [(1, *spatial, n, h), (1, *spatial, k, h), (1, *spatial, k, hv)]
    if rpb:
        shapes.append((n,) + tuple(2 * x - 1 for x in spec.kernel_size))
    target = "tpu_interpret" if reduction == "grid" else "interpret"
    kwargs = dict(dilation=spec.dilation, stride=spec.stride, is_causal=spec.is_causal)

    def impl(q, kk, v, *table):
        return pallas.neighborhood_attention(q, kk, v, table[0] if table else None, spec=spec, target=target,
                                             tiles=tiles, reduction=reduction)

    def ref(q, kk, v, *table):
        return jaxattn.neighborhood_attention(q, kk, v, spec.kernel_size, rpb=table[0] if table else None,
                                              return_lse=True, implementation="reference", **kwargs)

    return impl, ref, random_inputs(0, shapes)


# name: (spatial, kernel, options). Odd lengths, borders, several boxes per axis, uneven dilation groups.
CASES = {
    "1d_k5_dil2_rpb": ((37,), 5, dict(dilation=2, rpb=True, tiles=(8,))),
    "1d_k7_dil3_causal_gqa_hv": ((37,), 7, dict(dilation=3, causal=True, heads=(4, 2), dims=(8, 4), tiles=(4,))),
    "1d_even_k4_stride2_gqa": ((13,), 4, dict(stride=2, heads=(4, 2), tiles=(4,))),
    "2d_k3_dil_rpb": ((9, 11), 3, dict(dilation=(1, 2), rpb=True, tiles=(4, 4))),
    "2d_k3x5_causal_axis0_gqa": ((7, 9), (3, 5), dict(causal=(True, False), heads=(4, 2), tiles=(4, 4))),
    "2d_length1_axis_stride": ((1, 12), (1, 5), dict(stride=(1, 3), tiles=(1, 8))),
    "3d_dil_rpb": ((3, 4, 6), (3, 1, 3), dict(dilation=(1, 1, 2), rpb=True, tiles=(2, 2, 2))),
}
BF16 = ("1d_k5_dil2_rpb", "2d_k3_dil_rpb")
GRID = ("1d_k5_dil2_rpb", "2d_k3x5_causal_axis0_gqa")


@pytest.mark.parametrize("name,dtype,reduction", (
    [(name, jnp.float32, "fori") for name in CASES]
    + [(name, jnp.bfloat16, "fori") for name in BF16]
    + [(name, jnp.float32, "grid") for name in GRID]))
def test_kernel_matches_reference(name, dtype, reduction):
    spatial, kernel, opts = CASES[name]
    impl, ref, inputs = _case(spatial, kernel, reduction=reduction, **opts)
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=["query", "key", "value", "rpb"])


# ---- halo walks (pure numpy): every window key is visited, by both the query-major and the key-major walk ----

@given(length=st.integers(1, 40), kernel=st.integers(1, 9), dilation=st.integers(1, 4), stride=st.integers(1, 9),
       causal=st.booleans(), tile=st.sampled_from([1, 2, 4, 8, 16]))
def test_walks_cover_every_window(length, kernel, dilation, stride, causal, tile):
    dilation = min(dilation, length)
    kernel = min(kernel, length // dilation)
    stride = min(stride, kernel)
    geo = Geometry(1, (length,), 1, 1, (kernel,), (dilation,), (stride,), (causal,), (tile,))
    fwd, bwd = Walk.keys_of_queries(geo), Walk.queries_of_keys(geo)
    seen_fwd = {(i, j) for i in range(geo.num_boxes) for j in _visited(fwd, i)}
    seen_bwd = {(i, j) for j in range(geo.num_boxes) for i in _visited(bwd, j)}
    for p in range(length):
        keys, _ = windows.neighbors(p, length, kernel, dilation, stride, causal)
        for m in keys:
            pair = ((p // dilation) // tile, (m // dilation) // tile)
            assert pair in seen_fwd and pair in seen_bwd, (p, m, pair)
    assert len(seen_fwd) <= geo.num_boxes * fwd.steps


def _visited(walk: Walk, box: int):
    ranges = walk.ranges(box)
    return [int(walk.grid_box(ranges, r)) for r in range(walk.steps) if walk.grid_valid(ranges, r)]


def test_layout_round_trip_and_tables():
    geo = Geometry(2, (7, 5), 3, 3, (3, 3), (2, 1), (1, 1), (False, True), (2, 4))
    x = jnp.asarray(np.arange(2 * 7 * 5 * 3 * 2, dtype=np.float32).reshape(2, 7, 5, 3, 2))
    assert jnp.array_equal(geo.from_kernel(geo.to_kernel(x, 4), 2), x)
    lo0, hi0, lo1, hi1 = geo.query_tables
    assert lo0.shape == (geo.groups, geo.seq, 1) and geo.positions[1].shape == (1, geo.seq)
    assert (hi0 > lo0).all() and (hi1 > lo1).all()  # padded queries see themselves: never an empty window


@pytest.mark.parametrize("target,group_len,want", [
    ("tpu", (8192,), (128,)), ("tpu", (56, 56), (8, 16)), ("tpu", (5, 7), (5, 7)),
    ("triton", (56, 56), (4, 8)), ("triton", (3,), (16,)), ("triton", (2, 3), (2, 8)), ("interpret", (3,), (4,)),
])
def test_block_fitting(target, group_len, want):
    assert blocks.fit(target, group_len) == want


def test_bad_kernel_arguments_raise():
    q = jnp.zeros((1, 64, 2, 8))
    spec = _spec(1, 3)
    with pytest.raises(ValueError, match="tiles"):
        pallas.neighborhood_attention(q, q, q, spec=spec, target="tpu", tiles=(24,))
    with pytest.raises(ValueError, match="tiles"):
        pallas.neighborhood_attention(q, q, q, spec=spec, target="triton", tiles=(12,))
    with pytest.raises(ValueError, match="reduction"):
        pallas.neighborhood_attention(q, q, q, spec=spec, target="interpret", reduction="scan")


def test_constant_rpb_skips_its_gradient():
    """A bias table that is not differentiated costs no per-entry gradient sums (the dq kernel has one output)."""
    q, table = random_inputs(0, [(1, 16, 2, 8), (2, 5)])
    spec = _spec(1, 3)

    def loss(q, table):  # traced only, never lowered
        return pallas.neighborhood_attention(q, q, q, table, spec=spec, target="tpu")[0].sum()

    def dq_outputs(argnums):
        (outputs,) = pallas_call_outputs(jax.grad(loss, argnums=argnums), *(q, table), name="neighborhood_attention_dq")
        return outputs

    assert dq_outputs(0) == 1
    assert dq_outputs((0, 1)) == 2



# ---- lowering: fwd + bwd kernels for TPU (grid walk) and GPU (Pallas-Triton, fori walk), nothing runs ----

LOWERING = {
    "2d_56x56_k7_rpb": ((56, 56), 7, dict(heads=(4, 4), dims=(32, 32), rpb=True)),
    "1d_8192_k13_causal_gqa": ((8192,), 13, dict(heads=(4, 2), dims=(64, 64), causal=True)),
    "3d_small_dil_rpb_gqa": ((6, 7, 9), 3, dict(heads=(2, 1), dims=(16, 24), dilation=(1, 2, 1), rpb=True)),
}


@pytest.mark.parametrize("target", ["tpu", "triton"])
@pytest.mark.parametrize("name", list(LOWERING))
def test_lowers_forward_and_backward(target, name):
    spatial, kernel, opts = LOWERING[name]
    (n, k), (h, hv) = opts["heads"], opts["dims"]
    spec = _spec(len(spatial), kernel, opts.get("dilation", 1), 1, opts.get("causal", False))
    sds = jax.ShapeDtypeStruct
    args = [sds((1, *spatial, n, h), jnp.bfloat16), sds((1, *spatial, k, h), jnp.bfloat16),
            sds((1, *spatial, k, hv), jnp.bfloat16)]
    if opts.get("rpb"):
        args.append(sds((n,) + tuple(2 * x - 1 for x in spec.kernel_size), jnp.float32))
    cotangents = (sds((1, *spatial, n, hv), jnp.bfloat16), sds((1, *spatial, n), jnp.float32))

    def fn(q, kk, v, *table):
        return pallas.neighborhood_attention(q, kk, v, table[0] if table else None, spec=spec, target=target)

    text = assert_lowers(with_vjp(fn, range(len(args))), *args, cotangents, targets=(target,))[target]
    call = "tpu_custom_call" if target == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(call) == 3  # forward, dq (+ d rpb), dk/dv


# ---- dispatch ----

def test_op_api_runs_pallas_in_the_interpreter():
    q, k, v, table = random_inputs(1, [(1, 11, 2, 8), (1, 11, 2, 8), (1, 11, 2, 8), (2, 5)])
    kw = dict(dilation=2, rpb=table, scale=0.4, return_lse=True)
    got = jaxattn.neighborhood_attention(q, k, v, 3, implementation="pallas", **kw)
    want = jaxattn.neighborhood_attention(q, k, v, 3, implementation="reference", **kw)
    for a, r in zip(got, want):
        assert_allclose(a, r)


def test_dispatch_picks_pallas_on_accelerators(monkeypatch):
    q = jnp.zeros((1, 16, 2, 8))
    args = dict(query=q, key=q, value=q, rpb=None, spec=_spec(1, 3))
    assert dispatch.resolve(OP, None, **args).__name__ == "neighborhood_blocked"  # CPU: xla
    for backend in ("tpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert dispatch.resolve(OP, None, **args) is pallas.attention
        big = dict(args, rpb=jnp.zeros((2, 13, 13, 13)), spec=_spec(3, 7))  # 2197-entry table: xla
        assert dispatch.resolve(OP, None, **big).__name__ == "neighborhood_blocked"
    with pytest.raises(ValueError, match="does not support"):
        dispatch.resolve(OP, "pallas", **big)
