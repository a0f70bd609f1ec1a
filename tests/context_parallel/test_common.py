"""The halo-exchange acceptance predicates agree with the strategies' validation.

(Explicit-axes meshes with `mesh=` inside `jit` and no mesh context, forward and backward against the single-device
op, are `test_anywhere.py`'s, with every other placement.)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.context_parallel import halo_exchange_halo_attention, halo_neighborhood_attention
from jaxattn.context_parallel.halo_exchange import halo_attention_shardable, neighborhood_shardable


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
