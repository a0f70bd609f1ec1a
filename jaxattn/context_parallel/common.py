"""shard_map plumbing shared by every context-parallel strategy.

Layout: global heads-last arrays `[B, T, ...]`, batch split over `batch_axes` (default: every mesh axis but
`axis_name`), sequence split over `axis_name`, trailing dims replicated. Helpers here are deliberately small:
- `resolve_mesh(mesh)`: the given mesh or the current one (`jax.set_mesh` / `jax.sharding.use_mesh`).
- `sequence_spec(mesh, axis_name, batch_axes, rank)`: the `PartitionSpec` of such an array.
- `check_divisible(name, x, dim, n, what)`: `ValueError` naming the argument and its shape.
- `check_sequence_inputs(mesh, axis_name, batch_axes, multiple=1, **arrays)`: batch and length divisibility.
- `check_qkv(query, key, value)`: ranks, dtypes, matching dims of self-attention q/k/v (GQA allowed).
- `check_segment_ids(query, query_segment_ids, key_segment_ids)`: both or neither, integer `[B, T]`;
  `check_sinks(query, sinks)`: None or float `[N]`.
- `shard_sequence(fn, mesh, axis_name, batch_axes, n_in, n_out)`: `shard_call` (the one place that calls
  `jax.shard_map`) with those specs everywhere; inside a `shard_map` manual over `axis_name`, `fn` itself.
- `inside_shard_map(axis_name)`: whether the caller already is inside such a `shard_map` (arrays are shards).
- `check_outside_shard_map(axis_name, local_name)`: `ValueError` for strategies that need the global shapes.
Fresh arrays (scan carries, skipped blocks) are marked varying with `jaxattn.core.vma.varying_like`, so the
per-device bodies pass `shard_map`'s default `check_vma=True`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxattn.context_parallel.shard_call import manual_axes, shard_call
from jaxattn.core import validation


def resolve_mesh(mesh):
    """`mesh` itself, or the mesh set by `jax.set_mesh`/`use_mesh`; `ValueError` when there is none."""
    if mesh is not None:
        return mesh
    current = jax.sharding.get_abstract_mesh()
    if current is None or current.empty:
        raise ValueError("no mesh: pass `mesh=` or call inside `jax.set_mesh(mesh)` / `jax.sharding.use_mesh`")
    return current


def axis_size(mesh, axis_name: str) -> int:
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name` {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    return int(mesh.shape[axis_name])


def batch_axes_of(mesh, axis_name: str, batch_axes: Sequence[str] | str | None) -> tuple[str, ...]:
    """The mesh axes that split the batch: `batch_axes`, or by default every axis except `axis_name`."""
    if batch_axes is None:
        return tuple(a for a in mesh.axis_names if a != axis_name)
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    for a in axes:
        if a not in mesh.axis_names or a == axis_name:
            raise ValueError(f"`batch_axes` {axes} must name mesh axes other than `axis_name` {axis_name!r}; "
                             f"mesh axes {tuple(mesh.axis_names)}")
    return axes


def sequence_spec(mesh, axis_name: str, batch_axes, rank: int = 4) -> P:
    """`P(batch_axes, axis_name, None, ...)` for a `[B, T, ...]` array of rank `rank`."""
    axes = batch_axes_of(mesh, axis_name, batch_axes)
    batch = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return P(batch, axis_name, *([None] * (rank - 2)))


def check_divisible(name: str, x, dim: int, n: int, what: str) -> None:
    """`x.shape[dim]` must be a multiple of `n` (e.g. the sequence length and the context axis size)."""
    if x.shape[dim] % n:
        raise ValueError(f"`{name}` dimension {dim} ({x.shape[dim]}, shape {tuple(x.shape)}) must be divisible "
                         f"by {what} ({n})")


def local_scale(query, scale, *, is_causal: bool, zigzag_layout: bool) -> float:
    """The logit scale of a per-device body (default `H ** -0.5`); a causal zigzag shard must split in two chunks."""
    if zigzag_layout and is_causal:
        check_divisible("query", query, 1, 2, "2 (a zigzag shard is two chunks)")
    return query.shape[-1] ** -0.5 if scale is None else scale


def inside_shard_map(axis_name: str) -> bool:
    """Whether the current trace is inside a `shard_map` manual over `axis_name` (arrays are per-device shards)."""
    return axis_name in manual_axes()


def check_outside_shard_map(axis_name: str, local_name: str) -> None:
    """`ValueError` inside a `shard_map` manual over `axis_name`, for strategies whose global arguments (lengths,
    halos) cannot be read off the shards: the caller there calls the per-device body `local_name`."""
    if inside_shard_map(axis_name):
        raise ValueError(f"already inside a `shard_map` manual over {axis_name!r}: call the per-device body "
                         f"`{local_name}` there (its arrays are this device's shards)")


def check_sequence_inputs(mesh, axis_name: str, batch_axes, multiple: int = 1, **arrays) -> None:
    """Every array's length (dim 1) divides into `multiple * axis size` chunks; its batch into the batch axes.

    Lengths that do not divide are rejected, not padded: padding keys at the end is harmless under a causal mask
    but changes every softmax normaliser of non-causal attention, so the caller (who knows its padding) pads.
    Inside a `shard_map` manual over `axis_name` the arrays are shards: each must split into `multiple` chunks.
    """
    n = axis_size(mesh, axis_name)
    if inside_shard_map(axis_name):
        for name, x in arrays.items():
            check_divisible(name, x, 1, multiple, f"{multiple} (a shard of a zigzag layout is two chunks)")
        return
    nb = 1
    for a in batch_axes_of(mesh, axis_name, batch_axes):
        nb *= int(mesh.shape[a])
    what = f"the size of mesh axis {axis_name!r}" + (f" times {multiple}" if multiple > 1 else "")
    for name, x in arrays.items():
        if x.ndim < 2:
            raise ValueError(f"`{name}` must be at least [batch, length, ...], got shape {tuple(x.shape)}")
        check_divisible(name, x, 1, n * multiple, what)
        if nb > 1:
            check_divisible(name, x, 0, nb, "the product of the batch mesh axes")


def check_qkv(query, key, value) -> None:
    """Self-attention inputs `[B, T, N, H]`, `[B, T, K, H]`, `[B, T, K, Hv]` with `N % K == 0` and one dtype."""
    validation.check_rank("query", query, 4, "[batch, length, num_heads, head_dim]")
    validation.check_rank("key", key, 4, "[batch, length, num_kv_heads, head_dim]")
    validation.check_rank("value", value, 4, "[batch, length, num_kv_heads, head_dim]")
    validation.check_same_dtype(query=query, key=key, value=value)
    for name, x in (("key", key), ("value", value)):
        validation.check_dim(name, x, 0, query.shape[0], "batch size", "`query`")
        validation.check_dim(name, x, 1, query.shape[1], "length (self-attention over one sharded sequence)",
                             "`query`")
    validation.check_dim("key", key, 3, query.shape[3], "head_dim", "`query`")
    validation.check_dim("value", value, 2, key.shape[2], "num_kv_heads", "`key`")
    if key.shape[2] == 0 or query.shape[2] % key.shape[2]:
        raise ValueError(f"`query` heads ({query.shape[2]}) must be a multiple of `key`/`value` heads "
                         f"({key.shape[2]}); shapes {tuple(query.shape)} and {tuple(key.shape)}")


def check_segment_ids(query, query_segment_ids, key_segment_ids) -> None:
    """Both or neither; integer `[B, T]` each (self-attention: the keys have the queries' length)."""
    if (query_segment_ids is None) != (key_segment_ids is None):
        raise ValueError("give both `query_segment_ids` and `key_segment_ids`, or neither")
    if query_segment_ids is None:
        return
    for name, ids in (("query_segment_ids", query_segment_ids), ("key_segment_ids", key_segment_ids)):
        validation.check_rank(name, ids, 2, "[batch, length]")
        validation.check_dim(name, ids, 0, query.shape[0], "batch size", "`query`")
        validation.check_dim(name, ids, 1, query.shape[1], "length", "`query`")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"`{name}` must be integer, got dtype {ids.dtype}")


def check_sinks(query, sinks) -> None:
    """`sinks` is None or a float `[N]` (one logit per query head of `query [B, T, N, H]`)."""
    if sinks is None:
        return
    if tuple(sinks.shape) != (query.shape[2],) or not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(f"`sinks` must be a float array of shape ({query.shape[2]},) (one logit per query head "
                         f"of `query` {tuple(query.shape)}), got {sinks.dtype} {tuple(sinks.shape)}")


def shard_sequence(fn: Callable, mesh, axis_name: str, batch_axes, n_in: int, n_out: int, *,
                   ranks: Sequence[int] | None = None, replicated: int = 0, check_vma: bool = False) -> Callable:
    """`jax.shard_map(fn)` where each of the `n_in` inputs and `n_out` outputs is a sequence-sharded array.

    ranks: the rank of each input then each output (default 4, `[B, T, heads, dim]`). `n_out == 1` means `fn`
    returns one array (not a tuple); an input may be None (its spec is then None). `replicated` more inputs
    follow the `n_in`, whole on every device (`P()`: per-head parameters such as sinks). The shard_map itself
    (and the reshard that Explicit axes need, also inside `jit` without a mesh context) is `shard_call`'s.
    """
    ranks = tuple(ranks) if ranks is not None else (4,) * (n_in + n_out)
    specs = [sequence_spec(mesh, axis_name, batch_axes, r) for r in ranks]
    in_specs = tuple(specs[:n_in]) + (P(),) * replicated
    out_specs = specs[n_in] if n_out == 1 else tuple(specs[n_in:])

    def call(*args):
        specs = tuple(None if x is None else spec for x, spec in zip(args, in_specs))
        return shard_call(fn, mesh, specs, out_specs, *args, check_vma=check_vma, axis_name=axis_name)

    return call
