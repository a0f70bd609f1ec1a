"""Small helpers for kernel bodies shared by every Pallas kernel: naming refs and slicing blocks."""
from __future__ import annotations

from jax.experimental import pallas as pl


def split_refs(refs, names):
    """Names the positional refs of a kernel: `names` lists the present operands in order; the rest is scratch."""
    it = iter(refs)
    named = {name: next(it) for name in names}
    return named, list(it)


def key_slice(r, block):
    """The fori-mode slice of block `r` (of `block` rows) along an axis."""
    return pl.ds(pl.multiple_of(r * block, block), block)
