"""Logical axis names, the one table that maps them to mesh axes, and activation constraints.

Every parameter of a zoo model names each of its dimensions with a logical axis (`annotate(init, (EMBED, MLP))`
or `param_metadata(...)`); activations are constrained at block boundaries with the same vocabulary
(`constrain(x, (BATCH, LENGTH, ACT_EMBED))`). `RULES` maps each name to the mesh axes that may split it, in order;
`resolve` keeps those the mesh has (size > 1), that the dimension divides and that no earlier dimension of the same
array took. So one table serves every mesh layout: on `{'data': 8}` everything but the batch is replicated, on
`{'fsdp': 16, 'tensor': 4}` weights are split both ways (FSDP x Megatron), and `context` splits sequences.

Mesh axes: `data` (pure data parallelism: batch only), `fsdp` (batch, and parameters / optimizer state sharded),
`tensor` (Megatron: attention heads, MLP hidden units and the vocabulary split, activations all-reduced after the
output projections), `context` (sequences or image rows split; see `models/context_parallel.py`).

Parameters carry their names as `out_sharding` metadata with `eager_sharding=False`: building a model needs no
mesh; the training loop turns the names into `NamedSharding`s of the state (`train/sharding.py`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

# Parameter dimensions.
EMBED = "embed"  # the model width (d_model) of a weight: FSDP splits it
MLP = "mlp"  # hidden units of an MLP / GLU
HEADS = "heads"  # attention (query) heads
KV_HEADS = "kv_heads"  # key/value heads (GQA); replicated where `tensor` does not divide them
HEAD_DIM = "head_dim"
VOCAB = "vocab"
CONV_IN = "conv_in"  # convolution input channels
CONV_OUT = "conv_out"  # convolution output channels
CONV_KERNEL = "conv_kernel"  # a convolution's spatial window dims
NORM = "norm"  # scales and biases of norms (small: replicated)
LAYERS = "layers"  # the stacking axis of scanned blocks (`models/layers/stack.py`)

# Activation dimensions.
BATCH = "batch"
LENGTH = "length"  # a sequence's tokens
HEIGHT = "height"  # an image's rows (NHWC dim 1): context parallelism over rows
WIDTH = "width"
ACT_EMBED = "activation_embed"  # the residual stream's width (replicated: classic Megatron all-reduce)
# Activations of heads, MLP units and logits use HEADS, HEAD_DIM, MLP, VOCAB: they split like their weights.

# Logical name -> mesh axes that may split it, in order. Names missing here are replicated.
RULES: dict[str, tuple[str, ...]] = {
    BATCH: ("data", "fsdp"),
    LENGTH: ("context",),
    HEIGHT: ("context",),
    WIDTH: (),
    ACT_EMBED: (),
    EMBED: ("fsdp", "context"),  # context devices hold the same weights: shard over them too (ZeRO-3 style)
    MLP: ("tensor",),
    HEADS: ("tensor",),
    KV_HEADS: ("tensor",),
    HEAD_DIM: (),
    VOCAB: ("tensor",),
    CONV_IN: (),
    CONV_OUT: ("tensor", "fsdp"),
    CONV_KERNEL: (),
    NORM: (),
    LAYERS: (),
}


def rules(overrides: Sequence | Mapping = ()) -> dict[str, tuple[str, ...]]:
    """`RULES` with `overrides` applied: pairs `(name, mesh_axis | (mesh_axes...) | None)`, e.g. from
    `config.logical_axis_rules` (`(('activation_embed', 'tensor'),)` gives Megatron's sequence-parallel layout)."""
    out = dict(RULES)
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"`logical_axis_rules` entries must be (name, mesh_axis | mesh_axes | None), got {item!r}")
        name, target = item
        out[name] = (target,) if isinstance(target, str) else tuple(target or ())
    return out


def resolve(names: Sequence, shape: Sequence[int], mesh, table: Mapping[str, Sequence[str]]) -> P:
    """The `PartitionSpec` of an array of `shape` whose dims are named `names` (str, or None: replicated).

    Each dimension takes the mesh axes its rule lists that the mesh has with size > 1 and that no earlier
    dimension took, dropping the last ones until their product divides the dimension.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match the array's shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    used, spec = set(), []
    for name, dim in zip(names, shape):
        axes = [a for a in (table.get(name, ()) if name is not None else ()) if sizes.get(a, 1) > 1 and a not in used]
        while axes and dim % math.prod(sizes[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def current_rules() -> dict[str, tuple[str, ...]]:
    """The rules in scope (`nnx.logical_axis_rules(...)`, as the training loop sets them), else `RULES`."""
    in_scope = flax_spmd.get_logical_axis_rules()
    return rules(in_scope) if in_scope else dict(RULES)


def constrain(x: jax.Array, names: Sequence) -> jax.Array:
    """`x` constrained to the sharding its logical `names` resolve to on the mesh in scope.

    A no-op without a mesh (`jax.set_mesh`), and on meshes whose axes are not all `Auto` (Explicit axes carry
    shardings in the types; inside `shard_map` the axes are Manual).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.are_all_axes_auto:
        return x
    return jax.lax.with_sharding_constraint(x, resolve(names, x.shape, mesh, current_rules()))


def param_metadata(names: Sequence) -> dict:
    """Variable metadata naming a parameter's dims (`nnx.Param(value, **param_metadata(names))`)."""
    return dict(out_sharding=tuple(names), eager_sharding=False)


def annotate(init, names: Sequence):
    """An initializer whose parameter carries the logical `names` (for `kernel_init=` and the like)."""
    return nnx.with_metadata(init, **param_metadata(names))


def logical_names(variable: nnx.Variable) -> tuple | None:
    """A variable's logical dim names, or None when it has none (user models: the FSDP fallback applies)."""
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None
