"""LASP-2 context-parallel lightning attention against the single-device reference.

The numerical cases run in one child process with 8 forced host devices (`@pytest.mark.devices(8)`); argument
checks run in the parent (an `AbstractMesh` is enough to validate).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import lightning_attention
from jaxattn.context_parallel import lasp2_lightning_attention
from jaxattn.testing import assert_allclose, random_inputs

from linear_halo_helpers import assert_values_and_grads_match, collective_bytes

B, T, N, H, HV = 2, 64, 3, 8, 4
SLOPES = jnp.asarray([0.05, 0.2, 0.7], jnp.float32)  # 0.7 * 8 tokens per chunk: decays across chunks matter


def _mesh(data, context):
    return jax.make_mesh((data, context), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _reference(q, k, v, s0=None, *, slopes, is_causal, return_state=False, segment_ids=None):
    return lightning_attention(q, k, v, slopes=slopes, is_causal=is_causal, initial_state=s0,
                               return_state=return_state, segment_ids=segment_ids, implementation="reference")


def _documents():
    """Packed documents over 8 chunks of 8 tokens: row 0 has starts inside chunks, on chunk edges (8, 40), a
    document spanning three chunks (8..29), a one-token one and a reused id; row 1 one document over five chunks
    (its first and the initial state's), then one to the end (the final state's)."""
    ids = np.zeros((B, T), np.int32)
    ids[0, 3:], ids[0, 8:], ids[0, 30:], ids[0, 31:], ids[0, 40:], ids[0, 50:] = 1, 2, 3, 4, 5, 2
    ids[1, :], ids[1, 40:] = 5, 6
    return jnp.asarray(ids)


# Every case of one mesh in one compiled function (compiles dominate the test's time): (kwargs, with state).
CASES = [
    (dict(slopes=SLOPES, is_causal=True, block_size=4), False),  # several blocks per device
    (dict(slopes=None, is_causal=True), False),
    (dict(slopes=SLOPES, is_causal=False), False),
    (dict(slopes=None, is_causal=False), False),  # a psum of the states
    (dict(slopes=SLOPES, is_causal=True, return_state=True), True),  # initial and final state, replicated
]


def _check_cases(mesh, length, cases=CASES, dtype=jnp.float32):
    inputs = random_inputs(length, [(B, length, N, H), (B, length, N, H), (B, length, N, HV), (B, N, H, HV)],
                           scale=0.5)

    def run(fn):
        def all_cases(q, k, v, s0):
            return tuple(jax.tree.leaves([fn(q, k, v, s0 if state else None, **kwargs) for kwargs, state in cases]))
        return all_cases

    lasp2 = lambda q, k, v, s0, **kw: lasp2_lightning_attention(q, k, v, initial_state=s0, mesh=mesh, **kw)
    reference = lambda q, k, v, s0, block_size=None, **kw: _reference(q, k, v, s0, **kw)
    assert_values_and_grads_match(run(lasp2), run(reference), inputs, dtype=dtype,
                                  names=["query", "key", "value", "initial_state"])


@pytest.mark.devices(8)
def test_lasp2_matches_single_device():
    context8 = _mesh(1, 8)
    _check_cases(context8, T)
    # Batch over 'data', sequence over 'context' (the mesh from context); 4 tokens per device.
    with jax.set_mesh(_mesh(2, 4)):
        _check_cases(None, 16, CASES[:1] + CASES[2:3])
    # bf16 inputs (the op accumulates in fp32; so do the cross-device terms).
    _check_cases(context8, T, CASES[-1:], dtype=jnp.bfloat16)
    # Packed documents crossing device edges: states reach only their own document, both forms, with and
    # without decay, the initial state reaching the first document and the final state of the last.
    docs = _documents()
    _check_cases(context8, T, [(dict(slopes=SLOPES, is_causal=True, return_state=True, segment_ids=docs), True),
                               (dict(slopes=None, is_causal=True, return_state=True, segment_ids=docs), True),
                               (dict(slopes=SLOPES, is_causal=False, segment_ids=docs), False),
                               (dict(slopes=None, is_causal=False, segment_ids=docs), False)])

    # An Explicit-axes mesh in context, eager and jitted: inputs are resharded to the sequence layout.
    q, k, v = random_inputs(5, [(B, T, N, H)] * 3)
    expected = _reference(q, k, v, slopes=SLOPES, is_causal=True)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "context"))):
        assert_allclose(lasp2_lightning_attention(q, k, v, slopes=SLOPES), expected)
        out = jax.jit(functools.partial(lasp2_lightning_attention, slopes=SLOPES))(q, k, v)
        assert out.sharding.spec[:2] == ("data", "context")
        assert_allclose(out, expected)

    # Traffic, forward and backward, is state-sized: the same at T and 4T. The backward's only collective is
    # the all-gather's transpose, a reduce-scatter of one [B, N, H, Hv] state per device.
    def traffic(length, is_causal):
        x, v = jnp.zeros((B, length, N, H)), jnp.zeros((B, length, N, HV))
        fn = functools.partial(lasp2_lightning_attention, slopes=SLOPES, is_causal=is_causal, mesh=context8)
        return collective_bytes(lambda q, k, v, ct: jax.vjp(fn, q, k, v)[1](ct), x, x, v, v)

    state_bytes = B * N * H * HV * 4
    assert traffic(T, True) == traffic(4 * T, True) == {"all-gather": 8 * state_bytes, "reduce-scatter": state_bytes}
    # Bidirectional with decay: forward and reverse states travel together.
    assert traffic(T, False) == {"all-gather": 16 * state_bytes, "reduce-scatter": 2 * state_bytes}


def test_lasp2_rejects_bad_inputs():
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "context"))
    good = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)

    def call(q=good, k=good, v=good, **kwargs):
        kwargs.setdefault("mesh", mesh)
        return jax.eval_shape(functools.partial(lasp2_lightning_attention, **kwargs), q, k, v)

    odd = jax.ShapeDtypeStruct((B, T - 2, N, H), jnp.float32)
    with pytest.raises(ValueError, match=r"`query` dimension 1 \(62"):
        call(odd, odd, odd)
    with pytest.raises(ValueError, match="`key` length \\(62"):
        call(k=odd)
    with pytest.raises(ValueError, match="batch mesh axes"):
        call(*(jax.ShapeDtypeStruct((3, T, N, H), jnp.float32),) * 3)
    with pytest.raises(ValueError, match="`axis_name` 'seq'"):
        call(axis_name="seq")
    with pytest.raises(ValueError, match="no mesh"):
        call(mesh=None)
    with pytest.raises(ValueError, match="needs is_causal=True"):
        call(is_causal=False, return_state=True)
    with pytest.raises(ValueError, match="`slopes` must be >= 0"):
        call(slopes=-SLOPES)
    with pytest.raises(ValueError, match=r"`slopes` must have shape \[num_heads\]"):
        call(slopes=SLOPES[:2])
    with pytest.raises(ValueError, match="rank 4"):
        call(q=jax.ShapeDtypeStruct((B, T, N), jnp.float32))
