"""`shard_map` over arguments with mixed specs (sequence-sharded, batch-only, replicated, absent), callable inside
`jit` or eagerly, whatever the mesh's axis types and whether or not a mesh context is set. The one place where the
context-parallel strategies call `jax.shard_map`: `common.shard_sequence` (every argument sequence-sharded) builds
its specs and calls this; LASP-2 and halo exchange call it directly for their extra arguments (slopes, states,
bias tables), which are not sequence-sharded.

Already inside a `shard_map` that is manual over `axis_name` (a user's own per-device code), the arguments are
this device's shards: `body` runs on them directly. Manual over other axes of the specs only: `ValueError`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType


def manual_axes() -> frozenset:
    """The mesh axes the current trace is manual over (inside `jax.shard_map`); empty outside."""
    current = jax.sharding.get_abstract_mesh()
    if current is None or current.empty:
        return frozenset()
    return frozenset(a for a, t in zip(current.axis_names, current.axis_types) if t == AxisType.Manual)


def spec_axes(specs) -> set:
    """Every mesh axis named in a (nested) sequence of `PartitionSpec`s / None."""
    axes = set()
    for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)):
        for part in spec:
            axes.update(part if isinstance(part, tuple) else () if part is None else (part,))
    return axes


def shard_call(body: Callable, mesh, in_specs: Sequence, out_specs, *args, check_vma: bool = False,
               axis_name: str | None = None):
    """`jax.shard_map(body, mesh, in_specs, out_specs, check_vma=check_vma)(*args)`; `mesh` a `Mesh` or an
    `AbstractMesh` (then a mesh context must be set: `jax.set_mesh`).

    `args[i]` may be None (its spec must be None too). On a mesh with Explicit axes the arguments are first
    resharded to their specs (shard_map does not do it there), under the mesh's abstract mesh and inside a `jit`,
    so this works eagerly and inside `jit`, with or without a `jax.set_mesh` context. `axis_name`: the axis the
    body's collectives run over; when the caller already is inside a `shard_map` manual over it, `body(*args)`.
    The bodies mark their carries varying (`common.varying_like`), so `check_vma=True` holds too.
    """
    in_specs = tuple(in_specs)
    manual = manual_axes() & spec_axes((in_specs, out_specs))
    if manual:
        if axis_name is not None and axis_name in manual:
            return body(*args)
        raise ValueError(f"already inside a `shard_map` manual over {sorted(manual)}: call the strategy's "
                         f"per-device body (`*_local`) there, or the global function outside the shard_map")
    concrete = mesh if isinstance(mesh, jax.sharding.Mesh) else None
    if concrete is None:
        current = jax.sharding.get_abstract_mesh()
        if current is None or current.empty:
            raise ValueError(f"`mesh` is an AbstractMesh {dict(mesh.shape)} and no mesh is set: pass the concrete "
                             f"`jax.sharding.Mesh`, or call inside `jax.set_mesh(mesh)`")
    fn = jax.shard_map(body, mesh=concrete, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    abstract = mesh.abstract_mesh if concrete is not None else mesh
    if AxisType.Explicit not in tuple(abstract.axis_types):
        return fn(*args)  # Auto axes: shard_map reshards its inputs itself

    def resharded(*args):
        with jax.sharding.use_abstract_mesh(abstract):
            args = [x if spec is None else jax.reshard(x, spec) for x, spec in zip(args, in_specs)]
            return fn(*args)

    # Under `jit` (inlined inside an outer trace): run eagerly, the reshard would lower with an abstract mesh only.
    return jax.jit(resharded)(*args)
