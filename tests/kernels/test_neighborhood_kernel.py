"""Pallas neighborhood attention: interpreter numerics (both reduction walks) against the op's reference, forward
and backward (out, lse, dq, dk, dv, d rpb), fp32 and bf16, with query tiles and key boxes of different sizes; the
walks visit exactly the (query tile, key box) pairs that some window touches, both ways (numpy, hypothesis); the
logit counts and cost estimates; tile fitting per target; lowering for TPU (Mosaic) and GPU (Pallas-Triton) at
realistic and small shapes; dispatch. Real Mosaic compiles: `test_neighborhood_tpu_compile.py`."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxattn
from jaxattn.core import dispatch
from jaxattn.core import neighborhood_windows as windows
from jaxattn.kernels.common.verify import with_vjp
from jaxattn.kernels.neighborhood_attention import blocks, pallas
from jaxattn.kernels.neighborhood_attention.geometry import Geometry, Walk
from jaxattn.testing import assert_allclose, assert_lowers, assert_matches_reference, random_inputs
from jaxattn.testing.lowering import pallas_call_costs, pallas_call_outputs

from jaxattn.neighborhood.api import OP  # importing the op registers its backends


def _per_axis(x, nd):
    return tuple(x) if isinstance(x, tuple) else (x,) * nd


def _spec(nd, kernel, dilation=1, stride=1, causal=False):
    return windows.NASpec(_per_axis(kernel, nd), _per_axis(dilation, nd), _per_axis(stride, nd),
                          _per_axis(causal, nd))


def _case(spatial, kernel, *, dilation=1, stride=1, causal=False, rpb=False, heads=(2, 1), dims=(8, 8),
          tiles=None, key_tiles=None, reduction="fori"):
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
                                             tiles=tiles, key_tiles=key_tiles, reduction=reduction)

    def ref(q, kk, v, *table):
        return jaxattn.neighborhood_attention(q, kk, v, spec.kernel_size, rpb=table[0] if table else None,
                                              return_lse=True, implementation="reference", **kwargs)

    return impl, ref, random_inputs(0, shapes)


# name: (spatial, kernel, options). Odd lengths, borders, several tiles per axis, uneven dilation groups (whole
# padded tiles), key boxes smaller and larger than the query tiles and of other shapes, maps smaller than a tile.
CASES = {
    "1d_k5_dil2_rpb": ((37,), 5, dict(dilation=2, rpb=True, tiles=(8,), key_tiles=(4,))),
    "1d_k7_dil3_causal_gqa_hv": ((37,), 7, dict(dilation=3, causal=True, heads=(4, 2), dims=(8, 4), tiles=(4,),
                                                 key_tiles=(8,))),
    "1d_even_k4_stride2_gqa": ((13,), 4, dict(stride=2, heads=(4, 2), tiles=(4,), key_tiles=(2,))),
    "2d_k3_dil_rpb": ((9, 11), 3, dict(dilation=(1, 2), rpb=True, tiles=(4, 4), key_tiles=(2, 8))),
    "2d_k3x5_causal_axis0_gqa": ((7, 9), (3, 5), dict(causal=(True, False), heads=(4, 2), tiles=(4, 4),
                                                       key_tiles=(8, 2))),
    "2d_length1_axis_stride": ((1, 12), (1, 5), dict(stride=(1, 3))),  # default tiles (1, 16): one padded tile
    "3d_dil_rpb": ((3, 4, 6), (3, 1, 3), dict(dilation=(1, 1, 2), rpb=True, tiles=(2, 2, 2), key_tiles=(1, 2, 4))),
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


# ---- walks (pure numpy): exactly the tile pairs some window touches, the same pairs both ways ----

@given(length=st.integers(1, 40), kernel=st.integers(1, 9), dilation=st.integers(1, 4), stride=st.integers(1, 9),
       causal=st.booleans(), tile=st.sampled_from([1, 2, 3, 4, 8, 16]), box=st.sampled_from([1, 2, 4, 5, 8, 16]))
def test_walks_visit_exactly_the_touched_pairs(length, kernel, dilation, stride, causal, tile, box):
    dilation = min(dilation, length)
    kernel = min(kernel, length // dilation)
    stride = min(stride, kernel)
    geo = Geometry(1, (length,), 1, 1, (kernel,), (dilation,), (stride,), (causal,), (tile,), (box,))
    touched = set()  # (dilation group, query tile, key box) holding a window key; padded queries copy the last
    for g in range(dilation):
        lg = windows.group_length(length, dilation, g)
        for ii in range(geo.query_grid[0] * tile):
            keys, _ = windows.neighbors(g + min(ii, lg - 1) * dilation, length, kernel, dilation, stride, causal)
            touched |= {(g, ii // tile, (m // dilation) // box) for m in keys}
    assert _visited(geo, *geo.keys_of_queries()) == touched
    assert {(g, c, j) for g, j, c in _visited(geo, *geo.queries_of_keys())} == touched
    assert geo.visited_pairs == len(touched)


def _visited(geo: Geometry, walk: Walk, table):
    """(group, own tile, visited box) triples of a walk, read as the 'grid' index maps and the 'fori' loop do."""
    table, out = table.tolist(), set()
    for g in range(geo.groups):
        for i in range(math.prod(walk.tiles)):
            ranges = walk.ranges(table, g * geo.batch, i)
            grid = {walk.grid_box(ranges, r) for r in range(walk.steps) if walk.grid_valid(ranges, r)}
            fori = {walk.fori_box(ranges, r) for r in range(walk.count(ranges))}
            assert grid == fori
            out |= {(g, i, j) for j in grid}
    return out


def test_multi_axis_walk_counts_and_tables():
    """2-D with dilation, causal and uneven groups: the walk is the product of its axes, the logit counts match a
    brute-force count, and the tables round-trip through the tile-major layouts."""
    geo = Geometry(2, (7, 9), 3, 3, (3, 5), (2, 1), (1, 2), (False, True), (2, 4), (4, 1))
    pairs = _visited(geo, *geo.keys_of_queries())
    assert geo.visited_pairs == len(pairs)
    assert geo.computed_logits == len(pairs) * geo.block_q * geo.block_k
    keys, valid, _ = zip(*(windows.axis_tables(n, *geo_axis) for n, geo_axis in
                           zip(geo.spatial, zip(geo.kernel, geo.dilation, geo.stride, geo.causal))))
    assert geo.needed_logits == int(np.outer(valid[0].sum(1), valid[1].sum(1)).sum())
    x = jnp.asarray(np.arange(2 * 7 * 9 * 3 * 2, dtype=np.float32).reshape(2, 7, 9, 3, 2))
    for side in ("query", "key"):
        assert jnp.array_equal(geo.from_kernel(geo.to_kernel(x, 4, side), 2, side), x)
    lo0, hi0, lo1, hi1 = geo.query_tables
    assert lo0.shape == (geo.groups, geo.seq_q, 1) and geo.key_positions[1].shape == (geo.num_key_boxes, 1, 4)
    assert (hi0 > lo0).all() and (hi1 > lo1).all()  # padded queries copy a real window: never an empty one


@pytest.mark.parametrize("target,generation,spatial,kernel,want", [
    ("tpu", "v5e", (56, 56), 7, ((2, 64), (2, 64))),
    ("tpu", "v6e", (8192,), 13, ((256,), (256,))),
    ("tpu", None, (5, 7), 3, ((5, 7), (5, 7))),  # no generation known: the 128 plan; a small map is one tile
    ("triton", None, (56, 56), 7, ((4, 4), (4, 4))),
    ("triton", None, (3,), 3, ((16,), (16,))),
    ("triton", None, (2, 3), 1, ((2, 8), (2, 8))),
    ("interpret", None, (16, 16, 16), 3, ((1, 1, 16), (1, 1, 16))),
])
def test_tile_fitting(target, generation, spatial, kernel, want):
    assert blocks.fit(target, spatial, _spec(len(spatial), kernel), generation=generation) == want


def test_bad_kernel_arguments_raise():
    q = jnp.zeros((1, 64, 2, 8))
    spec = _spec(1, 3)
    for kw in (dict(tiles=(12,)), dict(key_tiles=(20,))):
        with pytest.raises(ValueError, match="tiles"):
            pallas.neighborhood_attention(q, q, q, spec=spec, target="tpu", **kw)
    with pytest.raises(ValueError, match="tiles"):
        pallas.neighborhood_attention(q, q, q, spec=spec, target="triton", key_tiles=(12,))
    with pytest.raises(ValueError, match="reduction"):
        pallas.neighborhood_attention(q, q, q, spec=spec, target="interpret", reduction="scan")
    with pytest.raises(ValueError, match="generation"):
        pallas.neighborhood_attention(q, q, q, spec=spec, target="tpu", generation="v9")


def test_cost_estimates_count_the_computed_logits():
    """Each kernel's `pl.CostEstimate` is derived from the logits it computes (what XLA's cost analysis adds up)."""
    q, table = random_inputs(0, [(2, 40, 4, 8), (4, 5)])
    spec = _spec(1, 3)

    def loss(q, table):  # traced only, never lowered
        return pallas.neighborhood_attention(q, q, q, table, spec=spec, target="tpu")[0].sum()

    estimates = pallas_call_costs(jax.grad(loss, argnums=(0, 1)), q, table)
    tq, tk = blocks.fit("tpu", (40,), spec)
    logits = Geometry(2, (40,), 4, 4, (3,), (1,), (1,), (False,), tq, tk).computed_logits * 2 * 4
    assert {name: (c.flops, c.transcendentals) for name, c in estimates.items()} == {
        "neighborhood_attention_fwd": (2 * 16 * logits, logits),
        "neighborhood_attention_dq": (2 * 24 * logits + 2 * 5 * logits, logits),
        "neighborhood_attention_dkv": (4 * 16 * logits, logits)}


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


def test_dispatch_picks_pallas_on_accelerators():
    q = jnp.zeros((1, 16, 2, 8))
    args = dict(query=q, key=q, value=q, rpb=None, spec=_spec(1, 3))
    big = dict(args, rpb=jnp.zeros((2, 13, 13, 13)), spec=_spec(3, 7))  # 2197-entry table: xla
    for platform, target in (("cpu", None), ("tpu", "tpu"), ("cuda", "triton")):
        want = ("xla", None) if platform == "cpu" else ("pallas", target)
        choice = dispatch.plan(OP, None, **args)[platform]
        assert (choice.backend, choice.target) == want
        assert dispatch.plan(OP, None, **big)[platform].backend == "xla"
    assert dispatch.resolve(OP, None, **args).__name__ == "neighborhood_blocked"
    with pytest.raises(ValueError, match="does not support"):
        dispatch.resolve(OP, "pallas", **big)
