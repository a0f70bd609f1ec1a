"""neighborhood_attention (NA / DiNA / causal / GNA): window rules, xla vs brute-force reference, special cases.

Index math is checked cheaply in numpy over wide sweeps (hand-worked literals, reference tables vs the xla
path's tile tables); numerics (forward, lse and gradients) on a smaller sweep, since every case compiles.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxattn
from jaxattn.core import dispatch
from jaxattn.core import neighborhood_windows as windows
from jaxattn.neighborhood import api, tiling, xla
from jaxattn.neighborhood.layout import Layout
from jaxattn.testing import assert_allclose, assert_matches_reference, random_inputs

HEAD_DIM, VALUE_DIM = 4, 3


# ----------------------------------------------------------------------------------------------- window rules

@pytest.mark.parametrize("i, length, kernel, dilation, stride, causal, keys, rel", [
    # L=7, k=3: shifted at both borders, never truncated.
    (0, 7, 3, 1, 1, False, [0, 1, 2], [2, 3, 4]),
    (3, 7, 3, 1, 1, False, [2, 3, 4], [1, 2, 3]),
    (6, 7, 3, 1, 1, False, [4, 5, 6], [0, 1, 2]),
    # L=7, d=2: groups {0,2,4,6} (Lg=4) and {1,3,5} (Lg=3), each clamped on its own.
    (0, 7, 3, 2, 1, False, [0, 2, 4], [2, 3, 4]),
    (4, 7, 3, 2, 1, False, [2, 4, 6], [1, 2, 3]),
    (6, 7, 3, 2, 1, False, [2, 4, 6], [0, 1, 2]),
    (3, 7, 3, 2, 1, False, [1, 3, 5], [1, 2, 3]),
    (5, 7, 3, 2, 1, False, [1, 3, 5], [0, 1, 2]),
    # Even k=4: two keys before the query, one after.
    (3, 6, 4, 1, 1, False, [1, 2, 3, 4], [1, 2, 3, 4]),
    (0, 6, 4, 1, 1, False, [0, 1, 2, 3], [3, 4, 5, 6]),
    (5, 6, 4, 1, 1, False, [2, 3, 4, 5], [0, 1, 2, 3]),
    # Causal: no shift, early queries see fewer keys.
    (0, 5, 3, 1, 1, True, [0], [2]),
    (1, 5, 3, 1, 1, True, [0, 1], [1, 2]),
    (3, 5, 3, 1, 1, True, [1, 2, 3], [0, 1, 2]),
    (4, 9, 3, 2, 1, True, [0, 2, 4], [0, 1, 2]),
    # Stride 2 on L=7: runs {0,1} {2,3} {4,5} {6}; leaders 1, 3, 5 and (partial run) 6.
    (0, 7, 3, 1, 2, False, [0, 1, 2], [2, 3, 4]),
    (2, 7, 3, 1, 2, False, [2, 3, 4], [2, 3, 4]),
    (3, 7, 3, 1, 2, False, [2, 3, 4], [1, 2, 3]),
    (5, 7, 3, 1, 2, False, [4, 5, 6], [1, 2, 3]),
    (6, 7, 3, 1, 2, False, [4, 5, 6], [0, 1, 2]),
    # Causal stride 2: the leader is the run's last query, the window ends at the query itself.
    (2, 7, 3, 1, 2, True, [1, 2], [1, 2]),
    (3, 7, 3, 1, 2, True, [1, 2, 3], [0, 1, 2]),
    (6, 7, 3, 1, 2, True, [4, 5, 6], [0, 1, 2]),
    # Stride == kernel (blocked): L=6, k=3 -> blocks {0,1,2}, {3,4,5}.
    (0, 6, 3, 1, 3, False, [0, 1, 2], [2, 3, 4]),
    (2, 6, 3, 1, 3, False, [0, 1, 2], [0, 1, 2]),
    (4, 6, 3, 1, 3, False, [3, 4, 5], [1, 2, 3]),
])
def test_windows_hand_worked(i, length, kernel, dilation, stride, causal, keys, rel):
    assert windows.neighbors(i, length, kernel, dilation, stride, causal) == (keys, rel)


def _param_sweep():
    for kernel in range(1, 10):
        for dilation in range(1, 5):
            for length in sorted({kernel * dilation, kernel * dilation + 1, 2 * kernel * dilation + 1}):
                for stride in sorted({1, 2, kernel} & set(range(1, kernel + 1))):
                    for causal in (False, True):
                        yield length, kernel, dilation, stride, causal


def _relation(length, queries, keys, rel):
    """`[L, L]` table: the bias index where query `i` sees key `j`, -1 elsewhere."""
    table = np.full((length, length), -1)
    table[queries, keys] = rel
    return table


def test_window_invariants_and_tile_tables_agree():
    """Over kernels 1..9, dilations 1..4, strides, causal, lengths from k*d up: the properties of ops.md hold and
    the xla path's tile tables (several tile sizes) give exactly the reference's key sets and bias indices."""
    for length, kernel, dilation, stride, causal in _param_sweep():
        keys, valid, rel = windows.axis_tables(length, kernel, dilation, stride, causal)
        counts = valid.sum(1)
        assert (counts == kernel).all() or causal
        assert (keys % dilation == (np.arange(length) % dilation)[:, None])[valid].all()
        if causal:
            assert (keys.max(1) == np.arange(length)).all() and (counts >= 1).all()
        rows = np.broadcast_to(np.arange(length)[:, None], keys.shape)
        expected = _relation(length, rows[valid], keys[valid], rel[valid])
        for tile in sorted({1, 3, stride * 2}):
            plan = tiling.axis_tiles(length, kernel, dilation, stride, causal, tile)
            x = np.arange(tile)[None, None, :, None]
            t = np.arange(plan.num_tiles)[None, :, None, None]
            g = np.arange(dilation)[:, None, None, None]
            query = np.broadcast_to((t * tile + x) * dilation + g, plan.mask.shape)
            key = np.broadcast_to(plan.key_index[:, :, None, :], plan.mask.shape)
            sel = plan.mask & (query < length)
            np.testing.assert_array_equal(_relation(length, query[sel], key[sel], plan.rel[sel]), expected)
            # A tile's halo: at most `tile + k - 1` keys (+ `s - 1` when runs straddle tiles), within one group.
            assert plan.span <= min(tile + kernel + stride - 2, math.ceil(length / dilation))


# ----------------------------------------------------------------------------------------- xla vs reference

def _inputs(shape, heads, kernel, rpb, seed=0, batch=1):
    n, kv = heads
    shapes = [(batch, *shape, n, HEAD_DIM), (batch, *shape, kv, HEAD_DIM), (batch, *shape, kv, VALUE_DIM)]
    if rpb:
        shapes.append((n, *[2 * k - 1 for k in kernel]))
    return random_inputs(seed, shapes)


def _op(impl, kernel, **kw):
    def f(q, k, v, *rpb):
        return jaxattn.neighborhood_attention(q, k, v, kernel, rpb=rpb[0] if rpb else None, return_lse=True,
                                              implementation=impl, **kw)
    return f


def _check(shape, kernel, heads=(2, 2), rpb=False, dtype=jnp.float32, grads=True, **kw):
    kernel_t = (kernel,) * len(shape) if isinstance(kernel, int) else kernel
    inputs = _inputs(shape, heads, kernel_t, rpb)
    impl, ref = _op("xla", kernel, **kw), _op("reference", kernel, **kw)
    if grads:
        assert_matches_reference(impl, ref, inputs, dtype=dtype, names=["query", "key", "value", "rpb"][:len(inputs)])
        return
    # Forward only: plain jitted calls (the harness would also build and compile the VJP).
    for name, a, r in zip(("out", "lse"), jax.jit(impl)(*inputs), jax.jit(ref)(*inputs)):
        assert_allclose(a, r, name=name)


# Forward and gradients (q, k, v, rpb), fp32: each code path (rpb, GQA, causal, stride, dilation, even kernels,
# unit axes, 1/2/3-D) at least once; the forward sweep below covers more parameter combinations.
GRAD_CASES = [
    ((9,), 3, dict(rpb=True)),
    ((13,), 5, dict(dilation=2, is_causal=True, stride=3)),                 # 13 % 2 != 0
    ((7,), 7, dict(stride=2, heads=(2, 1))),                                # k == L, GQA
    ((1, 9), (1, 3), dict(rpb=True)),                                       # length-1 axis, kernel 1
    ((7, 9), (3, 5), dict(dilation=(2, 1), rpb=True, heads=(2, 1))),
    ((8, 6), (4, 2), dict(dilation=(2, 3), stride=(2, 1))),                 # even kernels, k * d == L on axis 1
    ((9, 8), (6, 3), dict(is_causal=(False, True), stride=(3, 3))),         # causal along one axis only
    ((4, 5, 6), 3, dict(dilation=(1, 1, 2), is_causal=(True, False, True), stride=(1, 2, 3))),
    ((5, 7, 5), 3, dict(dilation=(1, 2, 1), rpb=True)),
]


@pytest.mark.parametrize("shape, kernel, kw", GRAD_CASES, ids=[f"{c[0]}-k{c[1]}-{sorted(c[2])}" for c in GRAD_CASES])
def test_xla_matches_reference_with_grads(shape, kernel, kw):
    _check(shape, kernel, **kw)


# Forward (and lse) only: kernels 2..9, dilations 1..4 on axes they do not divide, strides up to k, k * d == L.
FORWARD_CASES = [
    ((9,), 2, dict(dilation=4, stride=2)),
    ((11,), 2, dict(dilation=3)),
    ((3,), 3, dict(stride=3)),
    ((10,), 4, dict(dilation=2)),
    ((12,), 4, dict(stride=4)),                                             # stride == k: blocked
    ((16,), 5, dict(dilation=3, stride=4, is_causal=True)),
    ((13,), 6, dict(dilation=2, stride=6)),
    ((20,), 7, dict(stride=5, is_causal=True)),
    ((16,), 8, dict(dilation=2)),                                           # k * d == L
    ((11,), 9, dict(stride=9)),
    ((130,), 7, dict(dilation=3, stride=2, heads=(2, 1))),                  # several tiles per group, GQA
    ((27,), 9, dict(dilation=3, rpb=True)),                                 # k * d == L
    ((6, 9), (2, 9), dict(dilation=(3, 1), stride=(2, 7))),
    ((6, 7), 3, dict(is_causal=(True, False), stride=(1, 2))),
    ((13, 10), 3, dict(dilation=(4, 3), rpb=True)),                         # 13 % 4, 10 % 3 != 0
    ((5, 6, 7), (3, 2, 3), dict(dilation=(1, 2, 2))),
]


@pytest.mark.parametrize("shape, kernel, kw", FORWARD_CASES, ids=[f"{c[0]}-k{c[1]}" for c in FORWARD_CASES])
def test_xla_matches_reference_forward(shape, kernel, kw):
    _check(shape, kernel, grads=False, **kw)


@pytest.mark.parametrize("shape, kernel, kw", [
    ((7, 9), (3, 5), dict(dilation=(2, 1), rpb=True)),
    ((14,), 4, dict(dilation=3, is_causal=True, stride=2)),
])
def test_xla_matches_reference_bf16(shape, kernel, kw):
    _check(shape, kernel, dtype=jnp.bfloat16, **kw)


@pytest.mark.parametrize("shape, kernel, kw, tile", [
    ((23,), 5, dict(dilation=2, stride=2), 2),
    ((9, 7), 3, dict(dilation=(2, 1), rpb=True), (2, 3)),
])
def test_chunked_loop_matches_reference(shape, kernel, kw, tile):
    """Tiny tiles and a tiny logit budget force the `lax.map` + `jax.checkpoint` loop over many chunks."""
    kw = dict(kw)
    with_rpb = kw.pop("rpb", False)
    kernel_t = (kernel,) * len(shape)
    inputs = _inputs(shape, (2, 2), kernel_t, with_rpb)
    rpb = inputs[3] if with_rpb else None
    spec, scale = api._validate(*inputs[:3], kernel, kw.get("dilation", 1), kw.get("stride", 1), False, rpb, None)
    assert Layout.make(inputs[0].shape, 2, spec, tile, logit_budget=1).n_chunks > 2

    def blocked(q, k, v, *r):
        return xla.neighborhood_blocked(q, k, v, r[0] if r else None, scale=scale, spec=spec, tile=tile,
                                        logit_budget=1)

    assert_matches_reference(blocked, _op("reference", kernel, **kw), inputs)


# ----------------------------------------------------------------------------------------- special cases

def test_reference_gradients_numerically():
    with jax.enable_x64(True):
        q, k, v, rpb = (x.astype(jnp.float64) for x in _inputs((6,), (2, 2), (3,), rpb=True))

        @jax.jit
        def f(q, k, v, rpb):
            out = jaxattn.neighborhood_attention(q, k, v, 3, dilation=2, rpb=rpb, implementation="reference")
            causal = jaxattn.neighborhood_attention(q, k, v, 3, is_causal=True, stride=2, implementation="reference")
            return out, causal

        check_grads(f, (q, k, v, rpb), order=1, modes=("rev",))


def test_stride_equal_kernel_is_blocked_attention():
    def blocks(x):  # [1, 6, 8, N, D] -> [4 blocks, 12 tokens, N, D]
        x = x.reshape(2, 3, 2, 4, *x.shape[-2:]).transpose(0, 2, 1, 3, 4, 5)
        return x.reshape(4, 12, *x.shape[-2:])

    @jax.jit
    def both(q, k, v):
        out = jaxattn.neighborhood_attention(q, k, v, (3, 4), stride=(3, 4), implementation="xla")
        expected = jaxattn.dot_product_attention(blocks(q), blocks(k), blocks(v), implementation="reference")
        return out, expected.reshape(2, 2, 3, 4, 2, VALUE_DIM).transpose(0, 2, 1, 3, 4, 5).reshape(out.shape)

    assert_allclose(*both(*_inputs((6, 8), (2, 2), None, rpb=False)))


def test_kernel_covering_the_axis_is_full_attention():
    @jax.jit
    def both_2d(q, k, v):
        out = jaxattn.neighborhood_attention(q, k, v, (5, 4), implementation="xla")
        flat = [x.reshape(1, 20, *x.shape[-2:]) for x in (q, k, v)]
        return out, jaxattn.dot_product_attention(*flat, implementation="reference").reshape(out.shape)

    @jax.jit
    def both_causal(q, k, v):  # causal 1-D with k == L is ordinary causal attention
        out = jaxattn.neighborhood_attention(q, k, v, 6, is_causal=True, implementation="xla")
        return out, jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="reference")

    assert_allclose(*both_2d(*_inputs((5, 4), (2, 1), None, rpb=False)))
    assert_allclose(*both_causal(*_inputs((6,), (2, 2), None, rpb=False)))


def test_shorthands_default_dispatch_and_scale():
    def calls(fn):
        @jax.jit
        def run(q, k, v):
            expected = jaxattn.neighborhood_attention(q, k, v, 3, implementation="xla", scale=0.5)
            unscaled = jaxattn.neighborhood_attention(q * (0.5 / HEAD_DIM ** -0.5), k, v, 3, implementation="xla")
            return expected, fn(q, k, v, 3, scale=0.5), jaxattn.neighborhood_attention(q, k, v, 3, scale=0.5), unscaled
        return run

    for nd, fn in ((1, jaxattn.na1d), (2, jaxattn.na2d), (3, jaxattn.na3d)):
        expected, short, default, unscaled = calls(fn)(*_inputs((4,) * nd, (2, 2), None, rpb=False))
        np.testing.assert_array_equal(short, expected)
        np.testing.assert_array_equal(default, expected)
        assert_allclose(unscaled, expected)
    assert dispatch.resolve(api.OP, None) is xla.neighborhood_blocked


def test_xla_memory_is_linear_in_tokens():
    """No `n x n` logits: at 96x96 tokens the compiled temporaries are far below one dense logits matrix."""
    n = 96 * 96
    spec = [jax.ShapeDtypeStruct((1, 96, 96, 1, 8), jnp.float32)] * 3
    f = jax.jit(lambda q, k, v: jaxattn.neighborhood_attention(q, k, v, 7, implementation="xla"))
    temp = f.trace(*spec).lower().compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.05 * n * n * 4, temp


@given(st.data())
def test_hypothesis_shapes_and_params(data):
    nd = data.draw(st.integers(1, 2), label="ndim")
    shape, kernel, dilation, stride, causal = [], [], [], [], []
    for _ in range(nd):
        k = data.draw(st.integers(1, 6))
        d = data.draw(st.integers(1, 3))
        shape.append(data.draw(st.integers(k * d, k * d + 5)))
        kernel.append(k)
        dilation.append(d)
        stride.append(data.draw(st.integers(1, k)))
        causal.append(data.draw(st.booleans()))
    kw = dict(dilation=tuple(dilation), stride=tuple(stride), is_causal=tuple(causal))
    with_rpb = all(k % 2 for k in kernel) and not any(causal) and set(stride) == {1} and data.draw(st.booleans())
    _check(tuple(shape), tuple(kernel), heads=data.draw(st.sampled_from([(1, 1), (2, 1)])), rpb=with_rpb,
           grads=False, **kw)


# ----------------------------------------------------------------------------------------------- bad inputs

def _bad(shape=(8, 8), kernel=3, heads=(2, 2), **kw):
    q, k, v = _inputs(shape, heads, None, rpb=False)
    return jaxattn.neighborhood_attention(q, k, v, kernel, **kw)


@pytest.mark.parametrize("call, match", [
    (lambda: _bad(kernel=5, dilation=2), "kernel_size.*dilation.*exceeds"),
    (lambda: _bad(kernel=(3, 9)), "kernel_size.*exceeds"),
    (lambda: _bad(kernel=3, stride=4), "stride"),
    (lambda: _bad(kernel=(3, 3, 3)), "kernel_size"),
    (lambda: _bad(kernel=0), "kernel_size"),
    (lambda: _bad(dilation=0), "dilation"),
    (lambda: _bad(is_causal=1), "is_causal"),
    (lambda: _bad(rpb=jnp.zeros((2, 5, 4))), r"rpb.*shape"),
    (lambda: _bad(kernel=4, rpb=jnp.zeros((2, 7, 7))), "rpb.*odd"),
    (lambda: _bad(is_causal=(True, False), rpb=jnp.zeros((2, 5, 5))), "rpb.*causal"),
    (lambda: _bad(stride=2, rpb=jnp.zeros((2, 5, 5))), "rpb.*stride"),
    (lambda: _bad(heads=(3, 2)), "heads"),
    (lambda: _bad(implementation="nope"), "implementation"),
    (lambda: jaxattn.neighborhood_attention(jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 8)), 3),
     "query.*rank"),
    (lambda: jaxattn.neighborhood_attention(jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 7, 2, 4)),
                                            jnp.zeros((1, 7, 2, 4)), 3), "key.*spatial"),
    (lambda: jaxattn.neighborhood_attention(jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4), jnp.bfloat16),
                                            jnp.zeros((1, 8, 2, 4)), 3), "dtype"),
    (lambda: jaxattn.na2d(jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4)), 3),
     "query.*rank"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
