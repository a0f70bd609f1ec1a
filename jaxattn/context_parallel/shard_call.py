"""`shard_map` over arguments with mixed specs (sequence-sharded, batch-only, replicated, absent), callable inside
`jit` whatever the mesh's axis types and whether or not a mesh context is set. The one place where the
context-parallel strategies call `jax.shard_map`: `common.shard_sequence` (every argument sequence-sharded) builds
its specs and calls this; LASP-2 and halo exchange call it directly for their extra arguments (slopes, states,
bias tables), which are not sequence-sharded.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax


def shard_call(body: Callable, mesh, in_specs: Sequence, out_specs, *args, check_vma: bool = False):
    """`jax.shard_map(body, mesh, in_specs, out_specs, check_vma=check_vma)(*args)`; `mesh` a `Mesh` or an
    `AbstractMesh`.

    `args[i]` may be None (its spec must be None too). On a mesh with Explicit axes the arguments are first
    resharded to their specs (shard_map does not do it there); under the mesh's abstract mesh, so this also works
    inside `jit` without a `jax.set_mesh` context. `check_vma` is off by default: the ops' scans start from
    device-invariant carries, which the varying-axis type check rejects.
    """
    in_specs = tuple(in_specs)
    concrete = mesh if isinstance(mesh, jax.sharding.Mesh) else None
    fn = jax.shard_map(body, mesh=concrete, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    abstract = mesh.abstract_mesh if concrete is not None else mesh
    if jax.sharding.AxisType.Explicit not in tuple(abstract.axis_types):
        return fn(*args)  # Auto axes: shard_map reshards its inputs itself
    with jax.sharding.use_abstract_mesh(abstract):
        args = [x if spec is None else jax.reshard(x, spec) for x, spec in zip(args, in_specs)]
        return fn(*args)
