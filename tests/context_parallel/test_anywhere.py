"""Context parallelism wherever a user calls it (issue 19), against the single-device ops, on 8 host devices.

One child process (`@pytest.mark.devices(8)`) runs, grouping cases into one compiled function where the mesh
allows (compiles dominate):
- every strategy on Auto and Explicit meshes, with `mesh=` and under `jax.set_mesh`, eagerly and under `jit`,
  with and without a batch mesh axis (forward);
- local windows, segment ids, sinks and soft-cap for ring, all-gather and Ulysses (forward and gradients);
- the per-device bodies inside a user's `jax.shard_map` with the default `check_vma=True` (forward and
  gradients), and the global functions called there (they run the body, or say to call it).
In the parent: an `AbstractMesh` with no mesh context gets our message.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxattn import (dot_product_attention, halo_attention, lightning_attention, neighborhood_attention)
from jaxattn.context_parallel import (allgather_attention, halo_exchange_halo_attention, halo_neighborhood_attention,
                                      lasp2_lightning_attention, ring_attention, ulysses_attention)
from jaxattn.context_parallel.allgather import allgather_attention_local
from jaxattn.context_parallel.halo_exchange import halo_neighborhood_local, neighborhood_halo
from jaxattn.context_parallel.lasp2 import lasp2_local
from jaxattn.context_parallel.ring import ring_attention_local
from jaxattn.context_parallel.ulysses import ulysses_attention_local
from jaxattn.testing import random_inputs

from linear_halo_helpers import FAST_COMPILE, assert_values_and_grads_match

B, T = 2, 64
SEQ = [(B, T, 4, 8), (B, T, 2, 8), (B, T, 2, 8)]  # GQA: 4 query heads on 2 K/V heads
IMAGE = (B, 16, 8, 2, 4)


def _segments(seed):
    """Packed documents: `[B, T]` int32 ids, a new document with probability 1/10 at each token."""
    starts = jax.random.bernoulli(jax.random.key(seed), 0.1, (B, T))
    return jnp.cumsum(starts, axis=1).astype(jnp.int32)


def _dpa(q, k, v, **kwargs):
    return dot_product_attention(q, k, v, implementation="reference", **kwargs)


# (strategy, single-device op, inputs) for the placement matrix: forward only, every strategy.
def _placement_cases():
    seq, image = random_inputs(0, SEQ), random_inputs(1, [IMAGE] * 3)
    lin = random_inputs(2, [(B, T, 2, 8)] * 3)
    return {
        "ring": (functools.partial(ring_attention, is_causal=True), functools.partial(_dpa, is_causal=True), seq),
        "allgather": (functools.partial(allgather_attention, is_causal=True, local_window_size=(9, 0)),
                      functools.partial(_dpa, is_causal=True, local_window_size=(9, 0)), seq),
        "ulysses": (functools.partial(ulysses_attention, is_causal=True), functools.partial(_dpa, is_causal=True),
                    random_inputs(3, [(B, T, 8, 8)] * 3)),  # heads split over up to 8 devices
        "lasp2": (lasp2_lightning_attention, functools.partial(lightning_attention, implementation="reference"),
                  lin),
        "halo_na_2d": (functools.partial(halo_neighborhood_attention, kernel_size=3),
                       functools.partial(neighborhood_attention, kernel_size=3), image),
        "halonet": (functools.partial(halo_exchange_halo_attention, block_size=2, halo_size=1),
                    functools.partial(halo_attention, block_size=2, halo_size=1), image),
    }


def check_placements():
    """Forward only: the numerics of every strategy are the other tests' (tests/context_parallel)."""
    cases = _placement_cases()
    expected = _compiled(lambda: {name: ref(*xs) for name, (_, ref, xs) in cases.items()})()
    # (axis type, mesh shape, route, jit): each strategy on both axis types, both routes, both jit modes, with
    # a batch axis (data=2) and without (context=8).
    configs = [(AxisType.Auto, (2, 4), "mesh=", False), (AxisType.Explicit, (2, 4), "mesh=", True),
               (AxisType.Explicit, (1, 8), "set_mesh", True), (AxisType.Auto, (1, 8), "set_mesh", False)]
    # Strategy i runs configs i % 2 and i % 2 + 2: each pair has both axis types, both routes, jit and not, a
    # batch axis and none (half the compiles of the full product).
    for i, (name, (strategy, _, xs)) in enumerate(cases.items()):
        for axis_type, shape, route, jitted in configs[i % 2::2]:
            mesh = jax.make_mesh(shape, ("data", "context"), axis_types=(axis_type,) * 2)
            fn = functools.partial(strategy, mesh=mesh) if route == "mesh=" else strategy
            with jax.set_mesh(mesh) if route == "set_mesh" else _no_context():
                out = _compiled(fn, *xs)(*xs) if jitted else fn(*xs)
            np.testing.assert_allclose(np.asarray(out), expected[name], atol=3e-5, rtol=3e-5,
                                       err_msg=f"{name} {axis_type} {shape} {route} jit={jitted}")


def _compiled(fn, *args):
    """`jax.jit(fn)` compiled for `args` without XLA's backend optimisations (compiles dominate these tests)."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


class _no_context:
    def __enter__(self):
        assert jax.sharding.get_abstract_mesh().empty

    def __exit__(self, *exc):
        return False


def _grouped(cases):
    def run(*xs):
        return tuple(fn(*xs, **kwargs) for fn, kwargs in cases)
    return run


def check_windows_and_segments():
    """Windows, segment ids, sinks and soft-cap; the sinks `[N]` are the fourth input (gradients checked too)."""
    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(AxisType.Explicit,) * 2)  # 16 tokens per shard
    seg = _segments(3)
    ids = dict(query_segment_ids=seg, key_segment_ids=seg)
    cases = [(dict(is_causal=True, local_window_size=(20, 0)), False),  # two shards back
             (dict(local_window_size=(5, 19)), False),  # one shard back, two ahead
             (dict(is_causal=True, **ids), False),  # zigzag ring, ids travel with K/V
             (dict(is_causal=True, logits_soft_cap=2.0), True),  # the sink merged once, after the ring
             (dict(), True),
             (dict(is_causal=True, local_window_size=9, logits_soft_cap=3.0, **ids), True)]

    def with_sinks(fn, kwargs, sinks):
        return lambda q, k, v, s: fn(q, k, v, sinks=s if sinks else None, **kwargs)

    impl, ref = [], []
    for strategy in (ring_attention, allgather_attention):
        impl += [with_sinks(functools.partial(strategy, mesh=mesh), kw, sinks) for kw, sinks in cases]
        ref += [with_sinks(_dpa, kw, sinks) for kw, sinks in cases]
    for kw in (dict(is_causal=True, **ids), dict(is_causal=True, logits_soft_cap=2.0)):
        impl.append(with_sinks(functools.partial(ulysses_attention, mesh=mesh), kw, True))
        ref.append(with_sinks(_dpa, kw, True))
    assert_values_and_grads_match(_grouped([(f, {}) for f in impl]), _grouped([(f, {}) for f in ref]),
                                  random_inputs(4, SEQ + [(4,)]), names=["query", "key", "value", "sinks"])


def check_inside_user_shard_map():
    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(AxisType.Auto,) * 2)
    seq_spec, seg = P("data", "context"), _segments(5)
    halo = neighborhood_halo(T, 4, 5)
    bodies = [  # (per-device body or global function, kwargs, single-device op)
        (ring_attention_local, dict(is_causal=True), dict(is_causal=True)),
        (ring_attention_local, dict(local_window_size=(3, 20)), dict(local_window_size=(3, 20))),
        (allgather_attention_local, dict(is_causal=True), dict(is_causal=True)),
        (ulysses_attention_local, dict(is_causal=True), dict(is_causal=True)),
        (ring_attention, dict(is_causal=True), dict(is_causal=True)),  # global: zigzag moves, then the body
        (allgather_attention, dict(query_segment_ids=seg, key_segment_ids=seg),
         dict(query_segment_ids=seg, key_segment_ids=seg)),
    ]

    def sharded(fn, kwargs):  # segment ids enter the user's shard_map as arguments too
        ids = {k: v for k, v in kwargs.items() if k.endswith("segment_ids")}
        rest = {k: v for k, v in kwargs.items() if k not in ids}
        body = lambda q, k, v, ids: fn(q, k, v, **ids, **rest)  # noqa: E731
        inner = jax.shard_map(body, mesh=mesh, in_specs=(seq_spec,) * 3 + ({k: seq_spec for k in ids},),
                              out_specs=seq_spec)  # check_vma=True: the default
        return lambda q, k, v: inner(q, k, v, ids)

    impl = [(sharded(fn, kw), {}) for fn, kw, _ in bodies]
    ref = [(_dpa, kw) for _, _, kw in bodies]
    assert_values_and_grads_match(_grouped(impl), _grouped(ref), random_inputs(6, SEQ),
                                  names=["query", "key", "value"])

    # Neighborhood halo and LASP-2 bodies under check_vma=True too; their global functions say what to call.
    x = random_inputs(7, [(B, T, 2, 8)])[0]
    na = jax.shard_map(lambda a: halo_neighborhood_local(a, a, a, 5, halo=halo, axis_name="context"), mesh=mesh,
                       in_specs=seq_spec, out_specs=seq_spec)
    np.testing.assert_allclose(_compiled(na, x)(x), neighborhood_attention(x, x, x, 5), atol=3e-5)
    lasp = jax.shard_map(lambda a: lasp2_local(a, a, a), mesh=mesh, in_specs=seq_spec, out_specs=seq_spec)
    np.testing.assert_allclose(_compiled(lasp, x)(x), lightning_attention(x, x, x, implementation="reference"),
                               atol=1e-4, rtol=1e-4)  # unnormalised sums up to ~5
    for call, local in ((lambda a: halo_neighborhood_attention(a, a, a, 5), "halo_neighborhood_local"),
                        (lambda a: lasp2_lightning_attention(a, a, a), r"\*_local")):
        with pytest.raises(ValueError, match=f"already inside a `shard_map` manual over .*{local}"):
            jax.shard_map(call, mesh=mesh, in_specs=seq_spec, out_specs=seq_spec)(x)


@pytest.mark.devices(8)
def test_context_parallel_anywhere():
    check_placements()
    check_windows_and_segments()
    check_inside_user_shard_map()


def test_abstract_mesh_without_context_and_bad_windows():
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "context"))
    q = jnp.zeros((2, 64, 4, 8))
    for strategy in (ring_attention, allgather_attention, ulysses_attention, lasp2_lightning_attention):
        with pytest.raises(ValueError, match="AbstractMesh .* no mesh is set"):
            strategy(q, q, q, mesh=mesh)
    for strategy in (ring_attention, allgather_attention):
        with pytest.raises(ValueError, match="local_window_size"):
            strategy(q, q, q, mesh=mesh, local_window_size=-1)
        with pytest.raises(ValueError, match="contiguous"):
            strategy(q, q, q, mesh=mesh, local_window_size=4, is_causal=True, zigzag_order=True)
        with pytest.raises(ValueError, match=r"`sinks` must be a float array of shape \(4,\)"):
            strategy(q, q, q, mesh=mesh, sinks=jnp.zeros((2,)))
        with pytest.raises(ValueError, match="both"):
            strategy(q, q, q, mesh=mesh, query_segment_ids=jnp.zeros((2, 64), jnp.int32))
        with pytest.raises(ValueError, match="key_segment_ids"):
            ids = jnp.zeros((2, 64), jnp.int32)
            strategy(q, q, q, mesh=mesh, query_segment_ids=ids, key_segment_ids=ids[:, :32])
