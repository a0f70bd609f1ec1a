"""Kernel launches that run per shard of their batch and heads when the program is split over a mesh.

A Mosaic (`tpu_custom_call`) or Triton custom call is opaque to XLA's partitioner, which refuses to split it
("Mosaic kernels cannot be automatically partitioned"). `per_shard(fn, operands, dims, out_dims)` runs
`fn(*operands)` inside a `jax.shard_map` over the mesh axes that split batch rows and heads, so each device runs
the kernel on its shard (its grid covers the local rows and heads) and XLA only reshards around it. `fn` builds
its kernel from its operands' shapes, so it is the same function on one device and on a shard.

Why `shard_map` and not `jax.experimental.custom_partitioning` (which would pick up the partitioner's own
shardings): with this JAX and libtpu, a `custom_partitioning` call survives to the TPU compiler unpartitioned
("Custom emitter for CustomSPMDPartitioning not found", jax-ml/jax#38196; also with the partitioner registered on
the TPU plugin), and TPU pods are the case that needs it.

The mesh: the one in context (`jax.set_mesh`), else the abstract mesh of the operands' types (a `jit` of sharded
arrays). Axes used: those with more than one device that are not manual (inside a user's `shard_map`, e.g. ring
attention, only the remaining axes are split; with none left `fn` runs as is). Heads go over `HEAD_AXES`, never
over `SEQUENCE_AXES` (kernels need whole sequences), the batch over every other axis; an axis is used only while
the extent it splits stays divisible (else that dimension is replicated there). The same names as the training
mesh (`train/sharding.py`: batch over `data` x `fsdp`, heads over `tensor`, `context` for sequences).

Dimension roles, one letter per dimension in `dims` / `out_dims` strings (space separated):
  'b' the batch, 'n' query heads, 'k' key/value heads (GQA: `n = k * groups`, query head `i` reads key head
  `i // groups`; a split keeps whole groups, since it splits `k` and `n` into the same number of contiguous
  pieces), '.' anything else (replicated). A 'b'/'n'/'k' dimension whose extent is not the role's (a broadcast
  bias with one batch row, one head) is replicated. `heads=False` keeps heads whole (kernels with static per-head
  data, e.g. per-head windows).

Nothing changes on one device, or when every axis is manual: `fn` is called directly (inside a user's
`shard_map(check_vma=True)`, with the check off for the launch and the results typed varying like the operands). Otherwise the region is
manual over every remaining axis (Mosaic refuses partly automatic regions), and what cannot be split (a batch
or heads the axes do not divide) is replicated: each device then runs that part whole.
The kernels' custom VJPs call `per_shard` for each launch, forward and backward, so gradients are split the same.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxattn.core import vma

ROLES = ("b", "n", "k", ".")
HEAD_AXES = ("tensor", "model", "heads")  # mesh axes that split attention heads (Megatron tensor parallelism)
SEQUENCE_AXES = ("context", "sequence")  # mesh axes that split tokens: never used for a kernel's operands


def per_shard(fn: Callable, operands: Sequence, dims: Sequence, out_dims: Sequence[str], *, heads: bool = True):
    """`fn(*operands)` -> a tuple of arrays (one per `out_dims` entry), run per shard of batch and heads.
    `operands` may hold None and tuples (nested like `dims`; the `dims` entry of a None operand is ignored)."""
    leaves, tree = jax.tree.flatten(tuple(operands))
    leaf_dims = _leaf_dims(operands, dims)
    if len(leaf_dims) != len(leaves):
        raise ValueError(f"`dims` names {len(leaf_dims)} arrays, `operands` hold {len(leaves)}")
    for x, d in zip(leaves, leaf_dims):
        if len(d) != x.ndim or any(r not in ROLES for r in d):
            raise ValueError(f"dims {' '.join(d)!r} do not describe an operand of shape {x.shape} (roles {ROLES})")
    out_dims = [tuple(d.split()) for d in out_dims]

    def flat_fn(*flat):
        outs = tuple(fn(*tree.unflatten(flat)))
        if len(outs) != len(out_dims):
            raise ValueError(f"the kernel returns {len(outs)} arrays, `out_dims` describes {len(out_dims)}")
        return outs

    mesh = _mesh(leaves)
    free = [] if mesh is None else [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual]
    if not free or mesh.size == 1:
        return _unchecked(flat_fn, leaves, len(out_dims))
    layout = _Layout([x.shape for x in leaves], leaf_dims)
    axes = layout.split_axes(mesh, heads=heads, types=[jax.typeof(x) for x in leaves], dims=leaf_dims)
    in_specs = tuple(layout.spec(axes, x.shape, d) for x, d in zip(leaves, leaf_dims))
    out_specs = tuple(layout.spec(axes, None, d) for d in out_dims)
    leaves = [_reshard_explicit(x, spec, mesh) for x, spec in zip(leaves, in_specs)]
    # Manual over every axis left (a Mosaic call must not sit in a partly automatic region); what is not split
    # over an axis is replicated over it, and so is every result (the same on each of its devices).
    return jax.shard_map(flat_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(free),
                         check_vma=False)(*leaves)


def _unchecked(flat_fn, leaves, num_outs):
    """`flat_fn(*leaves)`; inside a user's `shard_map(check_vma=True)` (operands varying over manual axes) the
    launch is traced with the check off (a kernel's `out_shape` declares no varying axes) and its results are
    typed varying over every axis an operand varies over: each device computed them from its own shard."""
    if not vma.varying_axes(*leaves):
        return flat_fn(*leaves)
    outs = jax.shard_map(flat_fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(PartitionSpec(),) * len(leaves),
                         out_specs=(PartitionSpec(),) * num_outs, axis_names=set(), check_vma=False)(*leaves)
    return vma.varying_like(outs, *leaves)


def _leaf_dims(operands, dims) -> list[tuple[str, ...]]:
    out = []
    for x, d in zip(operands, dims):
        if x is None:
            continue
        if isinstance(x, (tuple, list)):
            out += _leaf_dims(x, d)
        else:
            out.append(tuple(d.split()))
    return out


def _mesh(leaves):
    """The mesh in context, else the one in the operands' types; None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        for x in leaves:
            sharding = getattr(jax.typeof(x), "sharding", None)
            candidate = getattr(sharding, "mesh", None)
            if candidate is not None and not candidate.empty:
                mesh = candidate
                break
    return None if mesh.empty else mesh


class _Layout:
    """The extents of 'b', 'n' and 'k' in one call's operands, and which of their dimensions carry them."""

    def __init__(self, shapes, dims):
        self.sizes = {}
        for shape, d in zip(shapes, dims):
            for size, role in zip(shape, d):
                if role != ".":
                    self.sizes[role] = max(size, self.sizes.get(role, 1))
        num_q, num_kv = self.sizes.get("n"), self.sizes.get("k")
        if num_q and num_kv and num_q % num_kv:
            raise ValueError(f"query heads ({num_q}) must be a multiple of key/value heads ({num_kv})")
        self.heads = num_kv or num_q or 1  # what a head split must divide (whole GQA groups)

    def split_axes(self, mesh, *, heads: bool, types, dims) -> dict[str, tuple[str, ...]]:
        """The mesh axes that split the batch ('b') and the heads ('heads'), outermost first. Auto axes by name;
        an Explicit axis only where the operands' types already split that role over it."""
        explicit = _explicit_splits(mesh, types, dims)
        kinds = dict(zip(mesh.axis_names, mesh.axis_types))

        def usable(a, role):
            if kinds[a] == AxisType.Manual or mesh.shape[a] == 1:
                return False
            return a in explicit.get(role, ()) if kinds[a] == AxisType.Explicit else a not in SEQUENCE_AXES

        head_role = "k" if "k" in self.sizes else "n"
        head_axes = ([a for a in mesh.axis_names if a in HEAD_AXES and usable(a, head_role)]
                     if heads and "n" in self.sizes else [])
        batch_axes = ([a for a in mesh.axis_names if a not in HEAD_AXES and usable(a, "b")]
                      if "b" in self.sizes else [])
        return {"b": _dividing(batch_axes, self.sizes.get("b", 1), mesh),
                "heads": _dividing(head_axes, self.heads, mesh)}

    def spec(self, axes, shape, d) -> PartitionSpec:
        """The PartitionSpec of an array with roles `d` (`shape` None: the roles' full extents)."""
        entries = []
        for i, role in enumerate(d):
            whole = role == "." or (shape is not None and shape[i] != self.sizes[role])
            split = () if whole else axes["b"] if role == "b" else axes["heads"]
            entries.append(None if not split else split[0] if len(split) == 1 else split)
        return PartitionSpec(*entries)


def _explicit_splits(mesh, types, dims) -> dict[str, set[str]]:
    """Per role, the Explicit mesh axes that some operand's type splits that role's dimension over."""
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    found = {}
    for t, d in zip(types, dims):
        spec = getattr(getattr(t, "sharding", None), "spec", None) or ()
        for role, entry in zip(d, spec):
            found.setdefault(role, set()).update(a for a in _axis_names(entry) if kinds.get(a) == AxisType.Explicit)
    return found


def _reshard_explicit(x, spec: PartitionSpec, mesh):
    """`x` resharded where its type's split over Explicit axes differs from `spec`'s (shard_map checks those)."""
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    if AxisType.Explicit not in kinds.values():
        return x

    def explicit(entries):
        out = []
        for entry in tuple(entries) + (None,) * (x.ndim - len(entries)):
            names = tuple(a for a in _axis_names(entry) if kinds.get(a) == AxisType.Explicit)
            out.append(None if not names else names[0] if len(names) == 1 else names)
        return PartitionSpec(*out)

    have = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or PartitionSpec()
    want = explicit(spec)
    if explicit(have) == want:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, want))


def _axis_names(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _dividing(names, extent: int, mesh) -> tuple[str, ...]:
    """`names` in order, each kept while the product of the kept axes' sizes still divides `extent`."""
    chosen, product = [], 1
    for a in names:
        if extent % (product * mesh.shape[a]) == 0:
            chosen.append(a)
            product *= mesh.shape[a]
    return tuple(chosen)
