"""Argument checks that raise `ValueError` naming the argument and the shapes involved."""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def check_rank(name: str, x, rank: int | Sequence[int], layout: str) -> None:
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if x.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"`{name}` must have rank {want} ({layout}), got shape {tuple(x.shape)}")


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating-point array, got dtype {x.dtype}")


def check_same_dtype(**arrays) -> None:
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"`{n}` {d}" for n, d in dtypes.items())
        raise ValueError(f"expected one dtype for {', '.join(dtypes)}; got {desc}")


def check_dim(name: str, x, axis: int, expected: int, what: str, other: str) -> None:
    if x.shape[axis] != expected:
        raise ValueError(
            f"`{name}` {what} ({x.shape[axis]}, shape {tuple(x.shape)}) must equal that of {other} ({expected})"
        )


def check_broadcastable(name: str, x, target: Sequence[int], layout: str) -> None:
    """`x` must broadcast to `target` without being broadcast itself beyond its rank."""
    if x.ndim > len(target):
        raise ValueError(f"`{name}` has rank {x.ndim} > {len(target)}; it must broadcast to {layout} = {tuple(target)}")
    for got, want in zip(x.shape[::-1], tuple(target)[::-1]):
        if got not in (1, want):
            raise ValueError(
                f"`{name}` of shape {tuple(x.shape)} does not broadcast to {layout} = {tuple(target)}"
            )


def per_axis(name: str, value, ndim: int, *, kind=int) -> tuple:
    """Expands an int/bool to a tuple of length `ndim`, or checks a given tuple's length."""
    if isinstance(value, (int, bool, np.integer, np.bool_)):
        return (kind(value),) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"`{name}` must be a {kind.__name__} or a tuple of {ndim} (one per spatial axis), got {value}")
    return tuple(kind(v) for v in value)


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
