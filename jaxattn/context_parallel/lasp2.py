"""LASP-2: lightning (decayed linear) attention with the sequence sharded over a mesh axis.

Device `i` of `P` holds tokens `[i*L, (i+1)*L)`. Linear attention needs from the other devices only their
*states*, `[N, H, Hv]` each whatever `L` is:
  1. local: `O_i` = lightning attention of the chunk from a zero state (the public op, any backend), and the
     chunk's state `S_i = sum_s lambda^(L-1-s) k_s^T v_s` (one einsum, fp32). `S_i` does not wait for `O_i`, so
     the collective below can overlap the local sweep.
  2. one `all_gather` of the `S_j` (plus the reverse states `R_j` when bidirectional with decay).
  3. prefix combine: the state entering chunk `i` is `sum_{j<i} lambda^((i-1-j)L) S_j + lambda^(iL) S0`.
  4. `o_r += lambda^(r+1) q_r . incoming` (row `r` of the chunk).
Step 4 is one `[L, H] x [H, Hv]` matmul per head, cheaper than re-running the chunk with `initial_state` (which
would redo the `L x block` intra-block work), so the chunk runs once from zero.

Bidirectional (`is_causal=False`, `o_t = sum_s lambda^|t-s| ...`): the later chunks contribute through reverse
states `R_j = sum_s lambda^s k_s^T v_s`, entering row `r` with `lambda^(L-r) q_r . sum_{j>i} lambda^((j-i-1)L) R_j`.
Without decay both directions are the same `K^T V`, so a `psum` of the states is all the traffic.

Packed documents (`segment_ids`): each device runs its chunk with its own ids, and its states hold one document
each (`S_i` the chunk's last, `R_i` its first). Besides the states the devices all-gather three ints per batch row
and chunk: the first and last segment id and whether the chunk holds a document start. A state reaches chunk `i`
only if no document starts between its chunk and `i` (counted with a prefix sum over the chunks: a start inside a
chunk in between, or an id that changes across a chunk edge), and then only the rows of the document it ends in.
The same rule takes the initial state to the first document and builds the final state from the last.

Gradients are plain autodiff through the `shard_map`: the transpose of the all-gather is a reduce-scatter of
state-sized cotangents, so the backward's traffic is independent of `T` too (checked on the HLO in the tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxattn.context_parallel import common
from jaxattn.core import segments
from jaxattn.context_parallel.shard_call import shard_call
from jaxattn.lightning import lightning_attention
from jaxattn.lightning.reference import decay_weights

F32 = jnp.float32


def lasp2_lightning_attention(query, key, value, *, slopes=None, is_causal=True, initial_state=None,
                              return_state=False, segment_ids=None, block_size=64, mesh=None, axis_name="context",
                              batch_axes=None, implementation=None):
    """`jaxattn.lightning_attention` with `T` sharded over the mesh axis `axis_name` (LASP-2).

    Same semantics and results as the single-device op (see its docstring); each device sends and receives
    `O(P * N * H * Hv)` bytes of states, independent of the sequence length.

    Args:
      query, key: global `[B, T, N, H]`; value: `[B, T, N, Hv]`; one floating dtype. `T` must be a multiple of
        the size `P` of `axis_name` (no padding: trailing pad tokens would change the final state). `N` equal
        for all three (the op has no grouped-query form).
      slopes: `[N]` decay rates or None (no decay); no gradient.
      is_causal: causal (default) or bidirectional.
      initial_state, return_state: as the op (causal only): `[B, N, H, Hv]`, the state is fp32 and replicated
        over `axis_name`.
      segment_ids: integer `[B, T]` (packed documents, as the op), sharded like the sequence; or None.
      block_size, implementation: the chunk op's block and backend, per device.
      mesh: a `Mesh`, or None for the mesh in scope (`jax.set_mesh`).
      axis_name: the mesh axis the sequence is sharded over.
      batch_axes: mesh axes that shard the batch; None means every other axis of the mesh.

    Returns:
      `out [B, T, N, Hv]` (sharded like the inputs), or `(out, final_state)`.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    initial_state = None if initial_state is None else jnp.asarray(initial_state)
    # The op's own checks on the global shapes (errors name the real arguments and shapes); `slopes` stays
    # concrete there, so negative rates are caught too.
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    jax.eval_shape(lambda q, k, v, s0, ids: lightning_attention(q, k, v, slopes=slopes, is_causal=is_causal,
                                                                block_size=block_size, initial_state=s0,
                                                                return_state=return_state, segment_ids=ids),
                   query, key, value, initial_state, segment_ids)
    mesh = common.resolve_mesh(mesh)
    common.check_sequence_inputs(mesh, axis_name, batch_axes, query=query, key=key, value=value)
    seq = common.sequence_spec(mesh, axis_name, batch_axes, 4)
    state_spec = PartitionSpec(seq[0])
    slopes = None if slopes is None else jax.lax.stop_gradient(jnp.asarray(slopes, jnp.float32))

    def body(q, k, v, s, s0, ids):
        return lasp2_local(q, k, v, slopes=s, is_causal=is_causal, initial_state=s0, return_state=return_state,
                           segment_ids=ids, block_size=block_size, axis_name=axis_name,
                           implementation=implementation)

    in_specs = (seq, seq, seq, None if slopes is None else PartitionSpec(),
                None if initial_state is None else state_spec, None if segment_ids is None else PartitionSpec(*seq[:2]))
    out_specs = (seq, state_spec) if return_state else seq
    return shard_call(body, mesh, in_specs, out_specs, query, key, value, slopes, initial_state, segment_ids)


def lasp2_local(query, key, value, *, slopes=None, is_causal=True, initial_state=None, return_state=False,
                segment_ids=None, block_size=64, axis_name="context", implementation=None):
    """The per-device body of `lasp2_lightning_attention`, for callers inside their own `shard_map`.

    `query, key [b, L, N, H]`, `value [b, L, N, Hv]`: this device's chunk, chunk `axis_index(axis_name)` of
    equal-length chunks in order. `initial_state` (`[b, N, H, Hv]`, the same on every device of the axis) sits
    before the first chunk. `segment_ids`: this chunk's `[b, L]` ids or None. Returns the chunk's output (and the
    final state after the last chunk, the same on every device).
    """
    out = lightning_attention(query, key, value, slopes=slopes, is_causal=is_causal, block_size=block_size,
                              segment_ids=segment_ids, implementation=implementation)
    length = query.shape[1]
    idx = jax.lax.axis_index(axis_name)
    num = jax.lax.axis_size(axis_name)
    rows = jnp.arange(length, dtype=F32)
    kf, vf, qf = key.astype(F32), value.astype(F32), query.astype(F32)
    links = None if segment_ids is None else _DocumentLinks(segment_ids, axis_name)

    def state(weights_to_edge, rows_in=None):  # sum_s w_s k_s^T v_s, weights [L, N] (times [b, L] row masks)
        return jnp.einsum("bsnh,bsne->bnhe", kf * _per_head(weights_to_edge, rows_in), vf)

    def enter(incoming, weights, rows_in=None):  # add w_r q_r . incoming to every row r
        return jnp.einsum("brnh,bnhe->brne", qf * _per_head(weights, rows_in), incoming)

    if not is_causal and slopes is None and links is None:
        kv = state(jnp.ones((length, 1), F32))
        others = jax.lax.psum(kv, axis_name) - kv
        return (out.astype(F32) + enter(others, jnp.ones((length, 1), F32))).astype(out.dtype)

    first_rows = None if links is None else links.first_document
    last_rows = None if links is None else links.last_document
    forward = state(_decay(slopes, length - 1 - rows), last_rows)  # S_i: token s decayed to the chunk's end
    chunks = jnp.arange(num, dtype=F32)
    if is_causal:
        gathered = jax.lax.all_gather(forward, axis_name)  # [P, b, N, H, Hv]
    else:
        backward = state(_decay(slopes, rows), first_rows)  # R_i: token s decayed to the chunk's start
        gathered_both = jax.lax.all_gather(jnp.stack([forward, backward]), axis_name)
        gathered, gathered_back = gathered_both[:, 0], gathered_both[:, 1]
        after = chunks - idx - 1  # chunks j > i, each L * (j - i - 1) further than the next chunk's start
        linked = None if links is None else links.from_later(idx)
        incoming_back = _combine(gathered_back, slopes, after, length, linked)
        out = out.astype(F32) + enter(incoming_back, _decay(slopes, length - rows), last_rows)

    before = idx - 1 - chunks  # chunks j < i, L * (i - 1 - j) before the previous chunk's end
    incoming = _combine(gathered, slopes, before, length, None if links is None else links.from_earlier(idx))
    if initial_state is not None:
        s0 = initial_state.astype(F32) * _decay(slopes, (idx * length).astype(F32))[None, :, None, None]
        if links is not None:
            s0 = s0 * links.from_start(idx)[:, None, None, None]
        incoming = incoming + s0
    out = (out.astype(F32) + enter(incoming, _decay(slopes, rows + 1), first_rows)).astype(query.dtype)
    if not return_state:
        return out
    final = _combine(gathered, slopes, num - 1 - chunks, length, None if links is None else links.to_end())
    if initial_state is not None:
        s0 = initial_state.astype(F32) * _decay(slopes, jnp.asarray(num * length, F32))[None, :, None, None]
        if links is not None:
            s0 = s0 * links.from_start(num)[:, None, None, None]
        final = final + s0
    return out, final


class _DocumentLinks:
    """Which chunks' states reach which chunk when documents are packed (module docstring).

    From the all-gathered `[P, b]` first/last segment ids and "holds a document start" flags: `barriers[u]` counts
    the starts on the way through chunk `u` (an id change at its left edge, plus one for any start inside it),
    `crossed[u]` is their prefix sum. A state leaving chunk `j` reaches the start of chunk `i > j` when
    `crossed[i-1] - crossed[j] + edge[i] == 0` (`edge[i]`: a change at chunk i's left edge)."""

    def __init__(self, segment_ids, axis_name):
        docs = segments.document_ids(segment_ids)
        self.first_document = (docs == 0).astype(F32)  # [b, L] rows of the chunk's first document
        self.last_document = (docs == docs[:, -1:]).astype(F32)  # rows of its last
        ids = segment_ids.astype(jnp.int32)
        gathered = jax.lax.all_gather(jnp.stack([ids[:, 0], ids[:, -1], (docs[:, -1] > 0).astype(jnp.int32)]),
                                      axis_name)  # [P, 3, b]
        first, last, inner = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        self.edge = jnp.concatenate([jnp.zeros_like(first[:1]), (first[1:] != last[:-1]).astype(jnp.int32)])
        self.crossed = jnp.cumsum(self.edge + inner, axis=0)  # [P, b]
        self.num = first.shape[0]

    def _crossed_before(self, i):  # crossed[i - 1], 0 for i = 0; i may be traced
        padded = jnp.concatenate([jnp.zeros_like(self.crossed[:1]), self.crossed])
        return jax.lax.dynamic_index_in_dim(padded, i, axis=0, keepdims=False)  # [b]

    def _edge(self, i):  # the id change at chunk i's left edge (none past the last chunk)
        padded = jnp.concatenate([self.edge, jnp.zeros_like(self.edge[:1])])
        return jax.lax.dynamic_index_in_dim(padded, i, axis=0, keepdims=False)

    def from_earlier(self, i):
        """`[P, b]`: the state leaving chunk j reaches chunk i's first document (meaningful for j < i)."""
        return (self._crossed_before(i)[None] - self.crossed + self._edge(i)[None] == 0).astype(F32)

    def from_start(self, i):
        """`[b]`: the initial state reaches chunk i's first document (i = P: the end of the sequence)."""
        return (self._crossed_before(i) + self._edge(i) == 0).astype(F32)

    def from_later(self, i):
        """`[P, b]`: the reverse state leaving chunk j (its first document) reaches chunk i's last one (j > i):
        no start in chunks i+1..j-1 or at the edges i/i+1 .. j-1/j, i.e. `crossed[j-1] - crossed[i] + edge[j]`."""
        crossed_i = jax.lax.dynamic_index_in_dim(self.crossed, i, axis=0, keepdims=False)
        before_j = jnp.concatenate([jnp.zeros_like(self.crossed[:1]), self.crossed[:-1]])
        return (before_j - crossed_i[None] + self.edge == 0).astype(F32)

    def to_end(self):
        """`[P, b]`: the state leaving chunk j is (part of) the final state: no start after it."""
        return (self.crossed[-1][None] - self.crossed == 0).astype(F32)


def _decay(slopes, distance):
    """`lambda^distance` per head, `[*distance.shape, N]` (`[..., 1]` without decay); distance >= 0."""
    return jnp.moveaxis(decay_weights(slopes, jnp.asarray(distance, F32)), 0, -1)


def _per_head(weights, rows_in=None):
    """`[L, N]` row weights (times `[b, L]` row masks) -> broadcastable against `[b, L, N, H]`."""
    weights = weights[None, :, :, None]
    return weights if rows_in is None else weights * rows_in[:, :, None, None]


def _combine(gathered, slopes, steps, length, linked=None):
    """`sum_j [steps_j >= 0] lambda^(steps_j * L) gathered_j` over the leading chunk axis of `[P, b, N, H, Hv]`
    (times `linked [P, b]`, which chunks' documents reach the target, when given)."""
    weights = _decay(slopes, jnp.maximum(steps, 0) * length) * (steps >= 0)[:, None]  # [P, N or 1]
    weights = jnp.broadcast_to(weights, (steps.shape[0], gathered.shape[2]))[:, None, :]  # [P, 1, N]
    if linked is not None:
        weights = weights * linked[:, :, None]
    weights = jnp.broadcast_to(weights, gathered.shape[:3])
    return jnp.einsum("pbn,pbnhe->bnhe", weights, gathered)

