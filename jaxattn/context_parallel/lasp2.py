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

Gradients are plain autodiff through the `shard_map`: the transpose of the all-gather is a reduce-scatter of
state-sized cotangents, so the backward's traffic is independent of `T` too (checked on the HLO in the tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxattn.context_parallel import common
from jaxattn.context_parallel.shard_call import shard_call
from jaxattn.lightning import lightning_attention
from jaxattn.lightning.reference import decay_weights

F32 = jnp.float32


def lasp2_lightning_attention(query, key, value, *, slopes=None, is_causal=True, initial_state=None,
                              return_state=False, block_size=64, mesh=None, axis_name="context", batch_axes=None,
                              implementation=None):
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
    jax.eval_shape(lambda q, k, v, s0: lightning_attention(q, k, v, slopes=slopes, is_causal=is_causal,
                                                           block_size=block_size, initial_state=s0,
                                                           return_state=return_state), query, key, value,
                   initial_state)
    mesh = common.resolve_mesh(mesh)
    common.check_sequence_inputs(mesh, axis_name, batch_axes, query=query, key=key, value=value)
    seq = common.sequence_spec(mesh, axis_name, batch_axes, 4)
    state_spec = PartitionSpec(seq[0])
    slopes = None if slopes is None else jax.lax.stop_gradient(jnp.asarray(slopes, jnp.float32))

    def body(q, k, v, s, s0):
        return lasp2_local(q, k, v, slopes=s, is_causal=is_causal, initial_state=s0, return_state=return_state,
                           block_size=block_size, axis_name=axis_name, implementation=implementation)

    in_specs = (seq, seq, seq, None if slopes is None else PartitionSpec(),
                None if initial_state is None else state_spec)
    out_specs = (seq, state_spec) if return_state else seq
    return shard_call(body, mesh, in_specs, out_specs, query, key, value, slopes, initial_state)


def lasp2_local(query, key, value, *, slopes=None, is_causal=True, initial_state=None, return_state=False,
                block_size=64, axis_name="context", implementation=None):
    """The per-device body of `lasp2_lightning_attention`, for callers inside their own `shard_map`.

    `query, key [b, L, N, H]`, `value [b, L, N, Hv]`: this device's chunk, chunk `axis_index(axis_name)` of
    equal-length chunks in order. `initial_state` (`[b, N, H, Hv]`, the same on every device of the axis) sits
    before the first chunk. Returns the chunk's output (and the final state after the last chunk, the same on
    every device).
    """
    out = lightning_attention(query, key, value, slopes=slopes, is_causal=is_causal, block_size=block_size,
                              implementation=implementation)
    length = query.shape[1]
    idx = jax.lax.axis_index(axis_name)
    num = jax.lax.axis_size(axis_name)
    rows = jnp.arange(length, dtype=F32)
    kf, vf, qf = key.astype(F32), value.astype(F32), query.astype(F32)

    def state(weights_to_edge):  # sum_s w_s k_s^T v_s with per-head weights [L, N]
        return jnp.einsum("bsnh,bsne->bnhe", kf * _per_head(weights_to_edge), vf)

    def enter(incoming, weights):  # add w_r q_r . incoming to every row r
        return jnp.einsum("brnh,bnhe->brne", qf * _per_head(weights), incoming)

    if not is_causal and slopes is None:
        kv = state(jnp.ones((length, 1), F32))
        others = jax.lax.psum(kv, axis_name) - kv
        return (out.astype(F32) + enter(others, jnp.ones((length, 1), F32))).astype(out.dtype)

    forward = state(_decay(slopes, length - 1 - rows))  # S_i: token s decayed to the chunk's end
    chunks = jnp.arange(num, dtype=F32)
    if is_causal:
        gathered = jax.lax.all_gather(forward, axis_name)  # [P, b, N, H, Hv]
    else:
        backward = state(_decay(slopes, rows))  # R_i: token s decayed to the chunk's start
        gathered_both = jax.lax.all_gather(jnp.stack([forward, backward]), axis_name)
        gathered, gathered_back = gathered_both[:, 0], gathered_both[:, 1]
        after = chunks - idx - 1  # chunks j > i, each L * (j - i - 1) further than the next chunk's start
        incoming_back = _combine(gathered_back, slopes, after, length)
        out = out.astype(F32) + enter(incoming_back, _decay(slopes, length - rows))

    before = idx - 1 - chunks  # chunks j < i, L * (i - 1 - j) before the previous chunk's end
    incoming = _combine(gathered, slopes, before, length)
    if initial_state is not None:
        s0 = initial_state.astype(F32)
        incoming = incoming + s0 * _decay(slopes, (idx * length).astype(F32))[None, :, None, None]
    out = (out.astype(F32) + enter(incoming, _decay(slopes, rows + 1))).astype(query.dtype)
    if not return_state:
        return out
    final = _combine(gathered, slopes, num - 1 - chunks, length)
    if initial_state is not None:
        final = final + initial_state.astype(F32) * _decay(slopes, jnp.asarray(num * length, F32))[None, :, None, None]
    return out, final


def _decay(slopes, distance):
    """`lambda^distance` per head, `[*distance.shape, N]` (`[..., 1]` without decay); distance >= 0."""
    return jnp.moveaxis(decay_weights(slopes, jnp.asarray(distance, F32)), 0, -1)


def _per_head(weights):
    """`[L, N]` row weights -> broadcastable against `[b, L, N, H]`."""
    return weights[None, :, :, None]


def _combine(gathered, slopes, steps, length):
    """`sum_j [steps_j >= 0] lambda^(steps_j * L) gathered_j` over the leading chunk axis of `[P, b, N, H, Hv]`."""
    weights = _decay(slopes, jnp.maximum(steps, 0) * length) * (steps >= 0)[:, None]  # [P, N or 1]
    return jnp.einsum("pn,pbnhe->bnhe", jnp.broadcast_to(weights, (steps.shape[0], gathered.shape[2])), gathered)

