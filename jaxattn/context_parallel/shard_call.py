"""`shard_map` over arguments with mixed specs (sequence-sharded, batch-only, replicated, absent), callable inside
`jit` whatever the mesh's axis types. Used by LASP-2 and halo exchange, whose extra arguments (slopes, states,
bias tables) are not sequence-sharded, so `common.shard_sequence` does not cover them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax


def shard_call(body: Callable, mesh, in_specs: Sequence, out_specs, *args):
    """`jax.shard_map(body, mesh, in_specs, out_specs, check_vma=False)(*args)`.

    `args[i]` may be None (its spec must be None too). On a mesh with Explicit axes the arguments are first
    resharded to their specs (shard_map does not do it there); under the mesh's abstract mesh, so this also works
    inside `jit` without a `jax.set_mesh` context. `check_vma` is off for the reason `common.shard_sequence` gives
    (the ops' scans start from device-invariant carries).
    """
    in_specs = tuple(in_specs)
    concrete = mesh if isinstance(mesh, jax.sharding.Mesh) else None
    fn = jax.shard_map(body, mesh=concrete, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    abstract = mesh.abstract_mesh if concrete is not None else mesh
    if jax.sharding.AxisType.Explicit not in tuple(abstract.axis_types):
        return fn(*args)  # Auto axes: shard_map reshards its inputs itself
    with jax.sharding.use_abstract_mesh(abstract):
        args = [x if spec is None else jax.reshard(x, spec) for x, spec in zip(args, in_specs)]
        return fn(*args)
