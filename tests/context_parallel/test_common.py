"""`common.shard_sequence` inside `jax.jit` with `mesh=` an Explicit-axes mesh and no `jax.set_mesh` context.

The strategies built on `shard_sequence` (all-gather, Ulysses, ring) reshard their inputs to the sequence specs
first on such a mesh. It was suspected to fail there ("enter your jit into a mesh context"); it does not (a
concrete `NamedSharding` needs no context), and `shard_sequence` now goes through `shard_call`, which reshards
under the mesh's abstract mesh. Kept as a regression test: forward and backward agree with the single-device op.
Also: the halo-exchange acceptance predicates agree with the strategies' validation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import dot_product_attention
from jaxattn.context_parallel import (allgather_attention, halo_exchange_halo_attention, halo_neighborhood_attention,
                                      ulysses_attention)
from jaxattn.context_parallel.halo_exchange import halo_attention_shardable, neighborhood_shardable
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


def test_halo_exchange_predicates_match_validation():
    """`neighborhood_shardable` / `halo_attention_shardable` (what DiNAT / HaloNet ask before sharding rows) say
    True exactly when the strategy's own validation accepts the map."""
    def accepts(fn, x, mesh, **kwargs):
        try:
            with jax.sharding.use_abstract_mesh(mesh):
                jax.eval_shape(functools.partial(fn, mesh=mesh, **kwargs), x, x, x)
        except ValueError:
            return False
        return True

    seen = set()
    for devices, length in ((2, 6), (4, 8), (4, 16)):
        mesh = jax.sharding.AbstractMesh((devices,), ("context",))
        seq = jax.ShapeDtypeStruct((1, length, 1, 2), jnp.float32)
        for kernel, dilation, causal in ((3, 1, False), (5, 1, True), (5, 2, False)):
            if kernel * dilation > length:
                continue  # the op's own check, not the sharding's
            got = accepts(halo_neighborhood_attention, seq, mesh, kernel_size=kernel, dilation=dilation,
                          is_causal=causal)
            assert got == neighborhood_shardable(length, devices, kernel, dilation, causal), \
                (length, devices, kernel, dilation, causal)
            seen.add(("na", got))
        image = jax.ShapeDtypeStruct((1, length, 4, 1, 2), jnp.float32)
        for block, halo in ((2, 1), (2, 3), (4, 2)):
            if length % block:
                continue  # the op's own check
            got = accepts(halo_exchange_halo_attention, image, mesh, block_size=block, halo_size=halo)
            assert got == halo_attention_shardable(length, devices, block, halo), (length, devices, block, halo)
            seen.add(("halo", got))
    assert len(seen) == 4  # both answers occur for both strategies
