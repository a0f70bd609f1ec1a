"""Context-parallel softmax attention (ring, all-gather, Ulysses) against the single-device reference.

The numerical cases run in two child processes with 8 forced host devices (`@pytest.mark.devices(8)`), grouped
so JAX starts twice; argument checks and the zigzag helpers run in the parent (an `AbstractMesh` is enough to
validate).
"""
from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxattn import dot_product_attention
from jaxattn.context_parallel import allgather_attention, ring_attention, ulysses_attention, zigzag
from jaxattn.context_parallel.allgather import allgather_attention_local
from jaxattn.context_parallel.common import shard_sequence
from jaxattn.context_parallel.ring import ring_attention_local
from jaxattn.testing import assert_matches_reference, random_inputs

B, T, H = 2, 64, 8


def _mesh(data, context, axis_type=jax.sharding.AxisType.Auto):
    return jax.make_mesh((data, context), ("data", "context"), axis_types=(axis_type,) * 2)


def _reference(q, k, v, *, is_causal, local_window_size=None):
    return dot_product_attention(q, k, v, is_causal=is_causal, local_window_size=local_window_size,
                                 implementation="reference")


def _check(strategy, mesh, heads, kv_heads, *, is_causal, dtype=jnp.float32, window=None, **kwargs):
    inputs = random_inputs(heads * 10 + kv_heads, [(B, T, heads, H), (B, T, kv_heads, H), (B, T, kv_heads, H)])
    extra = {} if window is None else {"local_window_size": window}
    impl = functools.partial(strategy, mesh=mesh, is_causal=is_causal, **extra, **kwargs)
    ref = functools.partial(_reference, is_causal=is_causal, local_window_size=window)
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=["query", "key", "value"])


@pytest.mark.devices(8)
def test_strategies_on_data2_context4_mesh():
    mesh = _mesh(2, 4)
    # Ring: zigzag (GQA), contiguous causal (skipped blocks), non-causal; bf16 through the zigzag ring.
    _check(ring_attention, mesh, 4, 2, is_causal=True)
    _check(ring_attention, mesh, 4, 4, is_causal=True, load_balance=False)
    _check(ring_attention, mesh, 4, 1, is_causal=False)
    _check(ring_attention, mesh, 4, 2, is_causal=True, dtype=jnp.bfloat16)
    # All-gather: zigzag causal with GQA, non-causal.
    _check(allgather_attention, mesh, 4, 2, is_causal=True)
    _check(allgather_attention, mesh, 4, 1, is_causal=False)
    # Ulysses: 2 K/V heads < 4 devices (repeated), causal; 4 K/V heads with a local window.
    _check(ulysses_attention, mesh, 8, 2, is_causal=True)
    _check(ulysses_attention, mesh, 4, 4, is_causal=False, window=(5, 3))


@pytest.mark.devices(8)
def test_strategies_on_context8_mesh():
    mesh = _mesh(1, 8, jax.sharding.AxisType.Explicit)  # inputs are resharded to the specs first
    _check(ring_attention, mesh, 4, 2, is_causal=True)
    _check(ring_attention, mesh, 2, 2, is_causal=True, load_balance=False, implementation="reference")
    _check(allgather_attention, mesh, 4, 2, is_causal=True, load_balance=False)
    _check(ulysses_attention, mesh, 8, 8, is_causal=True)

    # The mesh may also come from context; `zigzag_order=True` keeps the caller's zigzag layout in and out.
    q, k, v = random_inputs(3, [(B, T, 4, H), (B, T, 2, H), (B, T, 2, H)])
    expected = _reference(q, k, v, is_causal=True)
    zq, zk, zv = (zigzag.zigzag_permute(x, 8) for x in (q, k, v))
    with jax.set_mesh(mesh):
        for strategy in (ring_attention, allgather_attention):
            out = jax.jit(functools.partial(strategy, is_causal=True, zigzag_order=True))(zq, zk, zv)
            np.testing.assert_allclose(zigzag.zigzag_unpermute(np.asarray(out), 8), expected, atol=2e-5)

    # The backward's `delta = rowsum(d_out * out) - d_lse` is one reduction before the ring, not one per step.
    grad = jax.grad(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, is_causal=True).sum(), argnums=(0, 1, 2))
    local_rows = (B, T // 8, 4, H)  # the merged out of one device's queries
    assert _count_row_sums(jax.make_jaxpr(grad)(q, k, v).jaxpr, local_rows) == 1

    # The per-device zigzag moves (ppermutes) agree with the global permutation, and invert each other.
    x = jnp.arange(8 * T * 3, dtype=jnp.float32).reshape(8, T, 3)
    to_local = jax.jit(shard_sequence(lambda a: zigzag.to_zigzag_local(a, "context"), mesh, "context", (), 1, 1,
                                      ranks=(3, 3)))
    back = jax.jit(shard_sequence(lambda a: zigzag.from_zigzag_local(a, "context"), mesh, "context", (), 1, 1,
                                  ranks=(3, 3)))
    moved = to_local(x)
    np.testing.assert_array_equal(np.asarray(moved), np.asarray(zigzag.zigzag_permute(x, 8)))
    np.testing.assert_array_equal(np.asarray(back(moved)), np.asarray(x))


def _count_row_sums(jaxpr, shape):
    """`reduce_sum` over the last axis of a `shape` operand, in `jaxpr` and every jaxpr nested in it (a loop's
    body counts once, as traced)."""
    count = 0
    for eqn in jaxpr.eqns:
        if (eqn.primitive.name == "reduce_sum" and tuple(eqn.invars[0].aval.shape) == shape
                and tuple(eqn.params["axes"]) == (len(shape) - 1,)):
            count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    count += _count_row_sums(sub, shape)
    return count


# ------------------------------------------------------------------------------------------------------------
# In the parent process: no devices needed.

def test_zigzag_order_values():
    np.testing.assert_array_equal(zigzag.zigzag_order(4), [0, 7, 1, 6, 2, 5, 3, 4])
    x = np.arange(8)
    np.testing.assert_array_equal(zigzag.zigzag_permute(x[None], 2), [[0, 1, 6, 7, 2, 3, 4, 5]])


@given(num_shards=st.integers(1, 6), chunk=st.integers(1, 3), axis=st.sampled_from([0, 1, -1]))
def test_zigzag_round_trip(num_shards, chunk, axis):
    shape = [2, 3, 2]
    shape[axis] = 2 * num_shards * chunk
    x = np.arange(np.prod(shape)).reshape(shape)
    y = zigzag.zigzag_permute(x, num_shards, axis=axis)
    np.testing.assert_array_equal(zigzag.zigzag_unpermute(y, num_shards, axis=axis), x)
    # Device i's shard is chunk i followed by chunk 2n-1-i.
    chunks = np.split(x, 2 * num_shards, axis=axis)
    shards = np.split(np.asarray(y), num_shards, axis=axis)
    for i, s in enumerate(shards):
        np.testing.assert_array_equal(s, np.concatenate([chunks[i], chunks[2 * num_shards - 1 - i]], axis=axis))


def test_rejects_bad_inputs():
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "context"))
    q = jnp.zeros((2, 60, 8, 4))
    kv = jnp.zeros((2, 60, 2, 4))
    for strategy in (ring_attention, allgather_attention, ulysses_attention):
        with pytest.raises(ValueError, match=r"`query` dimension 1 \(62.*divisible by .*'context' \(4\)"):
            strategy(jnp.zeros((2, 62, 8, 4)), jnp.zeros((2, 62, 2, 4)), jnp.zeros((2, 62, 2, 4)), mesh=mesh)
        with pytest.raises(ValueError, match="batch"):
            strategy(jnp.zeros((3, 64, 8, 4)), jnp.zeros((3, 64, 2, 4)), jnp.zeros((3, 64, 2, 4)), mesh=mesh)
        with pytest.raises(ValueError, match="length"):
            strategy(jnp.zeros((2, 64, 8, 4)), kv, kv, mesh=mesh)
        with pytest.raises(ValueError, match="not an axis"):
            strategy(q, kv, kv, mesh=mesh, axis_name="seq")
    # Zigzag needs 2n chunks: 60 = 4 * 15 splits over the axis but not into 8 chunks.
    for strategy in (ring_attention, allgather_attention):
        with pytest.raises(ValueError, match=r"times 2"):
            strategy(q, kv, kv, mesh=mesh, is_causal=True)
        with pytest.raises(ValueError, match="load_balance"):
            strategy(q, kv, kv, mesh=mesh, zigzag_order=True, load_balance=False)
    q, kv = jnp.zeros((2, 64, 6, 4)), jnp.zeros((2, 64, 6, 4))
    with pytest.raises(ValueError, match=r"`query` heads \(6\) must be divisible by the axis size \(4\)"):
        ulysses_attention(q, kv, kv, mesh=mesh)
    q, kv = jnp.zeros((2, 64, 12, 4)), jnp.zeros((2, 64, 3, 4))
    with pytest.raises(ValueError, match=r"`key`/`value` heads \(3\)"):
        ulysses_attention(q, kv, kv, mesh=mesh)
    with pytest.raises(ValueError, match="multiple of `key`/`value` heads"):
        ring_attention(jnp.zeros((2, 64, 4, 4)), jnp.zeros((2, 64, 3, 4)), jnp.zeros((2, 64, 3, 4)), mesh=mesh)
    with pytest.raises(ValueError, match="no mesh"):
        ring_attention(q, q, q)
    # The per-device bodies check their zigzag shard splits into two chunks.
    odd = jnp.zeros((1, 7, 2, 4))
    for local in (ring_attention_local, allgather_attention_local):
        with pytest.raises(ValueError, match="zigzag shard"):
            local(odd, odd, odd, is_causal=True, zigzag_layout=True)
