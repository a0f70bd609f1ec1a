"""The device mesh, parameter and batch shardings, and host-local batches as global arrays.

The mesh comes from the config (`{'data': -1, 'fsdp': 1, 'context': 1}`: -1 takes the remaining devices) with Auto
axis types, so GSPMD propagates shardings through models written with logical annotations. Parameters take their
`PartitionSpec` from NNX logical annotations (`nnx.with_partitioning(init, ('embed', 'mlp'))`) mapped through the
config's logical axis rules; a parameter without annotations is sharded FSDP-style along its largest dimension that
the `fsdp` axis divides (replicated if none does, or if it is small). Batches are split along the batch dimension
over every data-parallel axis (`data`, `fsdp`) and, for sequences, along the length over `context` (for images,
along their rows: context parallelism over image rows).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
CONTEXT_AXIS = "context"
# Parameters smaller than this many elements stay replicated: sharding them saves nothing and costs collectives.
FSDP_MIN_SIZE = 2 ** 14


MESH_ORDER = ("data", "fsdp", "context")


def ordered_axes(axes: Mapping[str, int]) -> dict[str, int]:
    """Mesh axes in a fixed order (ConfigDicts sort their keys): data, fsdp, context, then the rest by name.
    Outer axes (data) span processes; inner ones stay within a host."""
    axes = dict(axes)
    return {**{a: axes[a] for a in MESH_ORDER if a in axes}, **{a: axes[a] for a in sorted(axes) if
                                                                 a not in MESH_ORDER}}


def resolve_mesh_sizes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes with the one -1 (if any) filled in; `ValueError` unless they multiply to `num_devices`."""
    axes = ordered_axes(axes)
    for required in (*BATCH_AXES, CONTEXT_AXIS):
        if required not in axes:
            raise ValueError(f"`mesh` needs a {required!r} axis (size 1 to leave it unused); got {axes}")
    sizes = dict(axes)
    if (any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes.values())
            or list(sizes.values()).count(-1) > 1):
        raise ValueError(f"`mesh` sizes must be positive integers, with at most one -1; got {axes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    for name, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise ValueError(f"`mesh` {axes}: {num_devices} devices are not divisible by {known}")
            sizes[name] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"`mesh` {axes} needs {math.prod(sizes.values())} devices, but there are {num_devices}")
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the named axes over `devices` (default: all devices of all processes), every axis
    `AxisType.Auto`. At most one size may be -1: it takes the devices that the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_sizes(axes, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(sizes)
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _resolve(logical: Sequence, rules: Mapping[str, object], mesh: Mesh) -> tuple:
    """Maps logical axis names to mesh axes; names without a rule, or rules naming absent axes, replicate."""
    used, out = set(), []
    for name in logical:
        target = rules.get(name) if isinstance(name, str) else name
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t in mesh.shape and t not in used and mesh.shape[t] > 1)
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return tuple(out)


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> tuple:
    n = mesh.shape.get(FSDP_AXIS, 1)
    spec = [None] * len(shape)
    if n > 1 and math.prod(shape) >= FSDP_MIN_SIZE:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                spec[dim] = FSDP_AXIS
                break
    return tuple(spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Mapping[str, object]) -> NamedSharding:
    return NamedSharding(mesh, _variable_spec(variable, mesh, rules))


def _variable_spec(variable, mesh: Mesh, rules: Mapping[str, object]) -> P:
    shape = tuple(variable.get_value().shape)
    logical = variable.get_metadata().get("out_sharding")
    if logical:
        spec = list(_resolve(logical, rules, mesh))
        for d, axes in enumerate(spec):  # an annotation the shape cannot honour replicates that dimension
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
            if shape[d] % size:
                spec[d] = None
        return P(*spec)
    return P(*_fsdp_spec(shape, mesh))


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Mapping[str, object]):
    """The (abstract) `nnx.State` with each variable's value replaced by its `NamedSharding`."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh, rules)), abstract_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, *, sequence: bool = False) -> NamedSharding:
    """Batch dimension over the data-parallel axes; dimension 1 (a sequence's length, an NHWC image's rows) over
    `context` when `sequence` is set and the mesh has `context > 1`."""
    spec = [BATCH_AXES] + [None] * (ndim - 1)
    if sequence and ndim > 1 and mesh.shape.get(CONTEXT_AXIS, 1) > 1:
        spec[1] = CONTEXT_AXIS
    return NamedSharding(mesh, P(*spec))


def batch_shardings(mesh: Mesh, batch: Mapping[str, np.ndarray], *, sequence_keys=()) -> dict:
    return {k: batch_sharding(mesh, np.ndim(v), sequence=k in sequence_keys) for k, v in batch.items()}


def to_global(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict:
    """Assembles this process's rows of a global batch into global `jax.Array`s (one call per process)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
