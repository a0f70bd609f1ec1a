"""`common.shard_sequence` inside `jax.jit` with `mesh=` an Explicit-axes mesh and no `jax.set_mesh` context.

The strategies built on `shard_sequence` (all-gather, Ulysses, ring) reshard their inputs to the sequence specs
first on such a mesh. It was suspected to fail there ("enter your jit into a mesh context"); it does not (a
concrete `NamedSharding` needs no context), and `shard_sequence` now goes through `shard_call`, which reshards
under the mesh's abstract mesh. Kept as a regression test: forward and backward agree with the single-device op.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import dot_product_attention
from jaxattn.context_parallel import allgather_attention, ulysses_attention
from jaxattn.testing import random_inputs


@pytest.mark.devices(8)
def test_explicit_mesh_argument_inside_jit_without_mesh_context():
    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    q, k, v = random_inputs(0, [(2, 16, 4, 8), (2, 16, 2, 8), (2, 16, 2, 8)])
    ref = functools.partial(dot_product_attention, is_causal=True, implementation="reference")
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
    expected = ref(q, k, v)
    expected_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    assert jax.sharding.get_abstract_mesh().empty  # no mesh context anywhere below
    for strategy in (allgather_attention, ulysses_attention):
        what = strategy.__name__
        impl = functools.partial(strategy, mesh=mesh, is_causal=True)
        np.testing.assert_allclose(jax.jit(impl)(q, k, v), expected, atol=2e-5, rtol=2e-5, err_msg=what)
        grads = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
        for g, e in zip(grads, expected_grads):
            np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4, err_msg=what)

