"""Packed documents in recurrent (linear) attention: segment ids -> document ids and the per-block masks that keep
a carried state inside one document.

A *document* is a maximal run of equal segment ids along the sequence (an id that recurs after another one starts
a new document, as fla's `cu_seqlens` would). `document_ids` numbers the runs 0, 1, 2, ... so every later check is
an equality of monotone integers, the same in the reference, the chunked XLA path, the kernels and LASP-2.

A chunked scan carries a state from block to block. With documents, a block of rows `r` entering with the state of
the document `d_in` (the document of the token just before the block in the scan's direction) needs:
  `same[r, c] = [d_r == d_c]`         inside the block (the decayed scores of other documents are dropped);
  `enter[r]   = [d_r == d_in]`        rows that see the incoming state;
  `leave[c]   = [d_c == d_out]`       rows whose keys go into the outgoing state (`d_out`: the document of the
                                      block's last row in the scan's direction: the next block enters with it);
  `keep       = [d_out == d_in]`      whether the incoming state survives the block (`enter` at that last row).
Forward scans enter block 0 with `d_in = d_0` (an initial state continues the first document); reverse scans enter
the last block with `d_in = d_{T-1}` (the reverse recurrence's initial state belongs to the last document).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LAYOUT = "[batch, length]"


def check_segment_ids(segment_ids, batch: int, length: int, name: str = "segment_ids"):
    """`segment_ids` as an int32 `[batch, length]` array (None passes through); a `ValueError` names the argument."""
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if tuple(segment_ids.shape) != (batch, length):
        raise ValueError(f"`{name}` must have shape {LAYOUT} = {(batch, length)}, got {tuple(segment_ids.shape)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"`{name}` must be integer, got dtype {segment_ids.dtype}")
    return segment_ids.astype(jnp.int32)


def document_ids(segment_ids):
    """`[B, T]` integer segment ids -> int32 document numbers: 0 at token 0, +1 wherever the id changes.
    Idempotent (document ids map to themselves); None passes through."""
    if segment_ids is None:
        return None
    ids = jnp.asarray(segment_ids).astype(jnp.int32)
    changes = (ids[:, 1:] != ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(ids[:, :1]), jnp.cumsum(changes, axis=1)], axis=1)


def pad_documents(doc_ids, length: int, *, front: bool = False):
    """Pads `[B, T]` document ids to `length` by repeating the edge id (the end, or the front): padded rows then
    belong to the document next to them, so block masks computed on the padded ids are those of the real rows."""
    extra = length - doc_ids.shape[1]
    if extra == 0:
        return doc_ids
    return jnp.pad(doc_ids, ((0, 0), (extra, 0) if front else (0, extra)), mode="edge")


class BlockMasks(NamedTuple):
    """The masks of the module docstring for every block of a padded `[B, nb * L]` sequence."""
    ids: jax.Array    # [B, nb * L] int32 document ids (for `same`)
    enter: jax.Array  # [B, nb * L] fp32
    leave: jax.Array  # [B, nb * L] fp32
    keep: jax.Array   # [B, nb] fp32


def block_masks(doc_ids, block: int, *, reverse: bool) -> BlockMasks:
    """Masks of the scan over blocks of `block` rows (in time order, or from the end when `reverse`) of document
    ids already padded to whole blocks (`pad_documents`)."""
    b, tp = doc_ids.shape
    if tp % block:
        raise ValueError(f"document ids of length {tp} are not padded to whole blocks of {block}")
    blocks = doc_ids.reshape(b, tp // block, block)
    if reverse:  # leaves with its first row; enters with the next block's first row (the last block: its last)
        leaving = blocks[:, :, 0]
        entering = jnp.concatenate([blocks[:, 1:, 0], blocks[:, -1:, -1]], axis=1)
    else:  # leaves with its last row; enters with the previous block's last row (block 0: its first)
        leaving = blocks[:, :, -1]
        entering = jnp.concatenate([blocks[:, :1, 0], blocks[:, :-1, -1]], axis=1)
    enter = (blocks == entering[:, :, None]).astype(jnp.float32).reshape(b, tp)
    leave = (blocks == leaving[:, :, None]).astype(jnp.float32).reshape(b, tp)
    return BlockMasks(doc_ids, enter, leave, (leaving == entering).astype(jnp.float32))

