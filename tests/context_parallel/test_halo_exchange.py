"""Halo exchange (neighborhood attention, HaloNet halo attention) against the single-device ops.

The numerical cases run in child processes with 8 forced host devices, grouped into one compiled function per
input shape (compiles dominate), against the single-device op's default path (tested against its reference in
tests/ops). The exactness argument of the module docstring (each device's block gives its
queries their global windows) is checked on the index math alone, in the parent, against brute force.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

from jaxattn import halo_attention, neighborhood_attention
from jaxattn.context_parallel import halo_exchange_halo_attention, halo_neighborhood_attention
from jaxattn.context_parallel.halo_exchange import neighborhood_halo, neighborhood_shardable
from jaxattn.core import neighborhood_windows as windows
from jaxattn.testing import assert_allclose, random_inputs

from linear_halo_helpers import assert_values_and_grads_match, collective_bytes


def _mesh(data, context):
    return jax.make_mesh((data, context), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _grouped(cases):
    """One function computing every `(fn, kwargs)` case on the same inputs, outputs flattened."""
    def run(*inputs):
        return tuple(jax.tree.leaves([fn(*inputs, **kwargs) for fn, kwargs in cases]))
    return run


def _na_cases(cases, mesh):
    """Case kwargs (`rpb`: an index into the rpb inputs) -> the halo-exchange and the single-device groups over
    `(q, k, v, *rpbs)`."""
    def call(op, extra):
        def fn(q, k, v, *rpbs, kernel, rpb=None, **kwargs):
            return op(q, k, v, kernel, rpb=None if rpb is None else rpbs[rpb], **kwargs, **extra)
        return fn

    sharded = call(halo_neighborhood_attention, {"mesh": mesh})
    single = call(neighborhood_attention, {})
    strip = lambda kw: {k: v for k, v in kw.items() if k != "axis"}
    return (_grouped([(sharded, kw) for kw in cases]), _grouped([(single, strip(kw)) for kw in cases]))


@pytest.mark.devices(8)
def test_halo_exchange_matches_single_device():
    mesh = _mesh(1, 8)
    names = ["query", "key", "value"]

    # 1-D, 64 tokens (8 per device), GQA (4 query heads on 2 key heads).
    inputs = random_inputs(0, [(2, 64, 4, 8), (2, 64, 2, 8), (2, 64, 2, 8)])
    cases = [dict(kernel=3), dict(kernel=7, dilation=2, return_lse=True), dict(kernel=5, dilation=2, is_causal=True),
             dict(kernel=4)]
    impl, ref = _na_cases(cases, mesh)
    assert_values_and_grads_match(impl, ref, inputs, names=names)
    impl, ref = _na_cases(cases[1:2], mesh)
    assert_values_and_grads_match(impl, ref, inputs, names=names, dtype=jnp.bfloat16)

    # 2-D, rows sharded (48 -> 6 per device) with rpb; columns sharded (16 -> 2 per device); a causal row axis.
    inputs = random_inputs(1, [(1, 48, 16, 2, 4)] * 3 + [(2, 5, 5), (2, 9, 9)])
    cases = [dict(kernel=5, dilation=2, rpb=1), dict(kernel=3, rpb=0, axis=2),
             dict(kernel=(3, 5), dilation=(2, 1), is_causal=(True, False))]
    impl, ref = _na_cases(cases, mesh)
    assert_values_and_grads_match(impl, ref, inputs, names=names + ["rpb3", "rpb5"])

    # HaloNet blocks: timm zero padding; masked padding with columns sharded; strided queries, halo > block.
    inputs = random_inputs(2, [(2, 32, 32, 2, 4)] * 3 + [(2, 16, 16, 2, 4), (15, 4), (15, 4)])

    def halo(op, extra):
        def fn(q, k, v, q2, rh, rw, *, block, halo, strided=False, **kwargs):
            q = q2 if strided else q
            return op(q, k, v, block, halo, rel_height=rh, rel_width=rw, query_stride=2 if strided else 1,
                      **kwargs, **extra)
        return fn

    cases = [dict(block=4, halo=2), dict(block=4, halo=2, mask_padding=True, axis=2),
             dict(block=2, halo=3, strided=True, mask_padding=True)]  # halo > block: 2 block rows of padding
    sharded = halo(halo_exchange_halo_attention, {"mesh": mesh})
    single = halo(halo_attention, {"implementation": "reference"})
    impl = _grouped([(sharded, kw) for kw in cases])
    ref = _grouped([(single, {k: v for k, v in kw.items() if k != "axis"}) for kw in cases])
    assert_values_and_grads_match(impl, ref, inputs, names=names + ["query_strided", "rel_height", "rel_width"])

    # Traffic (forward and backward) is border-sized: the same at L and 4L.
    def traffic(fn, shape):
        x = jnp.zeros(shape)
        return collective_bytes(lambda q, k, v, ct: jax.vjp(fn, q, k, v)[1](ct), x, x, x, x)

    na = functools.partial(halo_neighborhood_attention, kernel_size=5, dilation=2, mesh=mesh)
    border = lambda tokens: 2 * tokens * 2 * (8 + 8) * 4  # [B, tokens, heads, key and value dims] fp32
    # Forward: 4 tokens to each side; backward: the reverse ppermutes of the key/value cotangents.
    assert traffic(na, (2, 64, 2, 8)) == traffic(na, (2, 256, 2, 8)) == {"collective-permute": 4 * border(4)}
    # Causal: only (k - 1) * d = 8 tokens to the next device, and back.
    assert traffic(functools.partial(na, is_causal=True), (2, 64, 2, 8)) == {"collective-permute": 2 * border(8)}
    hn = functools.partial(halo_exchange_halo_attention, block_size=4, halo_size=2, mesh=mesh)
    assert traffic(hn, (1, 32, 8, 2, 4)) == {"collective-permute": 4 * (2 * 8 * 2 * (4 + 4) * 4)}  # 2 rows each way

    # Batch over 'data', rows over 'context' (mesh from context), Explicit axes: inputs are resharded.
    q, k, v = random_inputs(3, [(2, 24, 8, 2, 4)] * 3)
    expected = neighborhood_attention(q, k, v, 3, implementation="reference")
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "context"))):
        out = jax.jit(functools.partial(halo_neighborhood_attention, kernel_size=3))(q, k, v)
        assert out.sharding.spec[:2] == ("data", "context")
    assert_allclose(out, expected)


def _block_matches_global(length, devices, kernel, dilation, causal):
    """Builds every device's block as `halo_neighborhood_local` does and compares each local query's keys (and
    rpb indices) in the block, shifted back to global positions, with its global window. None when rejected."""
    if not neighborhood_shardable(length, devices, kernel, dilation, causal):
        return None
    left, right = neighborhood_halo(length, devices, kernel, dilation, causal)
    local = length // devices
    size = local + left + right
    keys, valid, rel = windows.axis_tables(length, kernel, dilation, 1, causal)
    bkeys, bvalid, brel = windows.axis_tables(size, kernel, dilation, 1, causal)
    for p in range(devices):
        start = 0 if p == 0 else length - size if p == devices - 1 else p * local - left
        for i in range(p * local, (p + 1) * local):
            j = i - start
            assert (bkeys[j][bvalid[j]] + start).tolist() == keys[i][valid[i]].tolist(), (p, i)
            assert brel[j][bvalid[j]].tolist() == rel[i][valid[i]].tolist(), (p, i)
    return left, right


def test_blocks_reproduce_global_windows_sweep():
    accepted = 0
    for devices in (2, 5):
        for local in range(1, 11):
            for kernel in (2, 3, 5, 7):
                for dilation in (1, 2, 3):
                    for causal in (False, True):
                        if kernel * dilation <= devices * local:
                            accepted += _block_matches_global(devices * local, devices, kernel, dilation,
                                                              causal) is not None
    assert accepted > 150


@given(devices=st.integers(1, 8), local=st.integers(1, 24), kernel=st.integers(1, 9), dilation=st.integers(1, 4),
       causal=st.booleans())
def test_blocks_reproduce_global_windows(devices, local, kernel, dilation, causal):
    if kernel * dilation <= devices * local:
        _block_matches_global(devices * local, devices, kernel, dilation, causal)


def test_halo_sizes():
    # Away from the borders: (k//2)*d each way (even k: k/2 before, k/2 - 1 after); causal: (k-1)*d before.
    assert neighborhood_halo(1024, 8, 7, 2) == (6, 6)
    assert neighborhood_halo(1024, 8, 4, 3) == (6, 3)
    assert neighborhood_halo(1024, 8, 7, 2, causal=True) == (12, 0)
    # Short shards: windows shifted inward at the global border reach further than (k//2)*d.
    assert neighborhood_halo(64, 8, 7, 3) == (13, 13)  # shards of 8: rejected
    assert _block_matches_global(64, 8, 7, 1, False) == (3, 3)
    assert _block_matches_global(16, 2, 3, 2, False) == (2, 2)
    assert _block_matches_global(48, 8, 7, 3, False) is None  # shards of 6 < 15: rejected


def test_halo_exchange_rejects_bad_inputs():
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "context"))
    seq = jax.ShapeDtypeStruct((2, 64, 2, 8), jnp.float32)

    def na(x=seq, kernel=3, **kwargs):
        kwargs.setdefault("mesh", mesh)
        return jax.eval_shape(functools.partial(halo_neighborhood_attention, kernel_size=kernel, **kwargs), x, x, x)

    with pytest.raises(ValueError, match=r"`query` dimension 1 \(62"):
        na(jax.ShapeDtypeStruct((2, 62, 2, 8), jnp.float32))
    with pytest.raises(ValueError, match="reaches 10 tokens into the previous shard"):  # shards of 4; border shift
        na(jax.ShapeDtypeStruct((2, 16, 2, 8), jnp.float32), kernel=7, dilation=2)
    two = jax.sharding.AbstractMesh((2,), ("context",))
    with pytest.raises(ValueError, match="must fit in the axis"):  # halos of 3 + 3 around 3 of 6 tokens
        na(jax.ShapeDtypeStruct((2, 6, 2, 8), jnp.float32), kernel=3, dilation=2, mesh=two)
    with pytest.raises(ValueError, match="`stride` must be 1 on the sharded axis"):
        na(kernel=3, stride=2)
    with pytest.raises(ValueError, match="`axis` must be a spatial axis"):
        na(axis=2)
    with pytest.raises(ValueError, match="exceeds spatial axis"):  # the op's own checks, on global shapes
        na(kernel=9, dilation=8)
    with pytest.raises(ValueError, match="no mesh"):
        na(mesh=None)

    image = jax.ShapeDtypeStruct((2, 32, 16, 2, 4), jnp.float32)

    def hn(x=image, block=4, halo=2, **kwargs):
        return jax.eval_shape(functools.partial(halo_exchange_halo_attention, block_size=block, halo_size=halo,
                                                mesh=mesh, **kwargs), x, x, x)

    with pytest.raises(ValueError, match="multiple of `block_size`"):  # 8 rows per device, blocks of 16
        hn(block=16)
    with pytest.raises(ValueError, match="at least `halo_size`"):
        hn(block=2, halo=9)
    with pytest.raises(ValueError, match=r"`query` dimension 2 \(6"):
        hn(jax.ShapeDtypeStruct((2, 32, 6, 2, 4), jnp.float32), block=2, axis=2)
    with pytest.raises(ValueError, match="`axis` must be 1"):
        hn(axis=3)
