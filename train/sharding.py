"""The device mesh, parameter and batch shardings, and host-local batches as global arrays.

The mesh comes from the config (`{'data': -1, 'fsdp': 1, 'tensor': 1, 'context': 1}`: -1 takes the remaining
devices) with Auto axis types, so GSPMD propagates shardings through models written with logical annotations.
Parameters take their `PartitionSpec` from their logical axis names (`jaxattn.models.layers.axes`: every zoo model
names every parameter's dims) mapped through the one rules table, `axes.RULES`, with `config.logical_axis_rules`
as overrides; a parameter without names (a user's model) is sharded FSDP-style along its largest dimension that
the `fsdp` axis divides (replicated if none does, or if it is small). Batches are split along the batch dimension
over every data-parallel axis (`data`, `fsdp`; replicated over `tensor`) and, for sequences, along the length over
`context` (for images, along their rows: context parallelism over image rows).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattn.models.layers import axes as axes_lib

BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
CONTEXT_AXIS = "context"
# Logical dims that Megatron must split evenly over `tensor` (attention heads, MLP units).
TENSOR_SPLIT_EVENLY = (axes_lib.HEADS, axes_lib.MLP)
# Parameters smaller than this many elements stay replicated: sharding them saves nothing and costs collectives.
FSDP_MIN_SIZE = 2 ** 14

# The mesh axes, outermost first: data spans processes (slow links), tensor is innermost (the most traffic per
# step, on the nearest devices).
MESH_ORDER = ("data", "fsdp", "context", "tensor")
REQUIRED_AXES = ("data", "fsdp", "context")  # `tensor` may be left out of older configs (size 1)


def ordered_axes(axes: Mapping[str, int]) -> dict[str, int]:
    """Mesh axes in `MESH_ORDER` (ConfigDicts sort their keys), `tensor` added with size 1 when absent;
    `ValueError` for an axis that is not one of them."""
    axes = dict(axes)
    unknown = sorted(set(axes) - set(MESH_ORDER))
    if unknown:
        raise ValueError(f"`mesh` axes must be among {MESH_ORDER}, got {unknown} in {axes}")
    axes.setdefault(TENSOR_AXIS, 1)
    return {a: axes[a] for a in MESH_ORDER if a in axes}


def resolve_mesh_sizes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes with the one -1 (if any) filled in; `ValueError` unless they multiply to `num_devices`."""
    for required in REQUIRED_AXES:
        if required not in axes:
            raise ValueError(f"`mesh` needs a {required!r} axis (size 1 to leave it unused); got {dict(axes)}")
    axes = ordered_axes(axes)
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


def logical_rules(config) -> dict[str, tuple[str, ...]]:
    """The logical-axis table (`jaxattn.models.layers.axes.RULES`) with `config.logical_axis_rules` applied."""
    return axes_lib.rules(config.logical_axis_rules)


def logical_axis_scope(rules: Mapping | Sequence = ()):
    """`nnx.logical_axis_rules` holding the whole table (`axes.RULES` updated by `rules`), so that the models'
    activation constraints (`axes.constrain`) and flax's own resolve through it."""
    return nnx.logical_axis_rules(tuple(axes_lib.rules(rules).items()))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> tuple:
    n = mesh.shape.get(FSDP_AXIS, 1)
    spec = [None] * len(shape)
    if n > 1 and math.prod(shape) >= FSDP_MIN_SIZE:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                spec[dim] = FSDP_AXIS
                break
    return tuple(spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Mapping = ()) -> NamedSharding:
    """A variable's sharding: its logical names through `axes.RULES` updated by `rules` (`axes.resolve`: dims
    the mesh axes do not divide are replicated); without names (user models), FSDP along its largest dimension
    that `fsdp` divides."""
    shape = tuple(variable.get_value().shape)
    names = axes_lib.logical_names(variable)
    spec = axes_lib.resolve(names, shape, mesh, axes_lib.rules(rules)) if names else P(*_fsdp_spec(shape, mesh))
    return NamedSharding(mesh, spec)


def check_tensor_split(params: nnx.State, mesh: Mesh) -> None:
    """`ValueError` naming `mesh.tensor` when it does not divide a dimension that Megatron must split evenly
    (attention heads, MLP units). Key/value heads and vocabularies that it does not divide stay replicated."""
    n = mesh.shape.get(TENSOR_AXIS, 1)
    if n == 1:
        return
    for path, variable in nnx.to_flat_state(params):
        for dim, (name, size) in enumerate(zip(axes_lib.logical_names(variable) or (), variable.get_value().shape)):
            if name in TENSOR_SPLIT_EVENLY and size % n:
                where = "/".join(map(str, path))
                raise ValueError(f"`mesh.tensor` = {n} must divide every {name!r} dimension; parameter {where} "
                                 f"{tuple(variable.get_value().shape)} has {size} along dim {dim}")


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Mapping = ()):
    """The (abstract) `nnx.State` with each variable's value replaced by its `NamedSharding` (`rules`: overrides
    of `axes.RULES`, as `variable_sharding`)."""
    rules = axes_lib.rules(rules)
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
