"""Lightning attention as a real Triton kernel (`triton_kernels.py`), launched from JAX through `jax_triton`.

The GPU path that does not depend on Pallas-Triton (deprecated in JAX 0.11). It reads the op's heads-last arrays
in place (no transposes or padding: masked loads), and shares the custom VJP (`vjp.py`: one scan forward, three
backward) with the Pallas kernels and the launch plans (`triton_launch.py`) with the tests. `jax_triton` is imported
when a kernel is traced, so importing this module is free on machines without a GPU. Same features as `pallas.py`
(packed documents included: the masks of `jaxattn.core.segments`, padded to whole blocks per scan).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn.core import segments
from jaxattn.kernels.common import partition
from jaxattn.kernels.lightning_attention import triton_launch, vjp


@dataclasses.dataclass(frozen=True)
class _Static:
    blocks: tuple | None = None  # (block, block_c, num_warps, num_stages) override of triton_launch.BLOCKS


def _triton_call():
    import jax_triton  # lazily: it raises ImportError on a CPU-only jax
    return jax_triton.triton_call


def _scan(a, b, c, slopes, init, docs, static: _Static, *, reverse: bool, want_state: bool, out_dtype=None):
    """The `vjp.py` scan on heads-last arrays: `(o [B, T, N, Dc], state [B, N, Da, Dc] fp32 or None)`; `docs`:
    document ids `[B, T]` or None. Runs per shard of batch and heads (`partition.per_shard`)."""
    def local(*operands):
        out, state = _scan_shard(*operands, static, reverse=reverse, want_state=want_state, out_dtype=out_dtype)
        return (out, state) if want_state else (out,)

    outs = partition.per_shard(local, (a, b, c, slopes, init, docs), SCAN_DIMS, SCAN_OUT_DIMS[:1 + want_state])
    return outs[0], (outs[1] if want_state else None)


SCAN_DIMS = ("b . n .", "b . n .", "b . n .", "n", "b n . .", "b .")  # a, b, c, slopes, init, docs (heads-last)
SCAN_OUT_DIMS = ("b . n .", "b n . .")  # o, state


def _scan_shard(a, b, c, slopes, init, docs, static: _Static, *, reverse: bool, want_state: bool, out_dtype=None):
    from jaxattn.kernels.lightning_attention import triton_kernels
    batch, t, heads, da = a.shape
    dc = c.shape[-1]
    launch = triton_launch.plan(batch=batch, length=t, heads=heads, dim_a=da, dim_c=dc, reverse=reverse,
                                decay=slopes is not None, init=init is not None, want_state=want_state,
                                fp32=a.dtype == jnp.float32, blocks=static.blocks, documents=docs is not None)
    dummy = jnp.zeros((1,), jnp.float32)
    masks = (jnp.zeros((1,), jnp.int32), dummy, dummy)
    if docs is not None:
        consts = launch.constexprs
        masks = segments.block_masks(segments.pad_documents(docs, consts["TP"]), consts["BLOCK"], reverse=reverse)
        masks = (masks.ids, masks.enter, masks.leave)
    inputs = (a, b, c, dummy if slopes is None else slopes.astype(jnp.float32),
              dummy if init is None else init.astype(jnp.float32), *masks)
    out_shape = [jax.ShapeDtypeStruct(c.shape, out_dtype or c.dtype),
                 jax.ShapeDtypeStruct((batch, heads, da, dc) if want_state else (1,), jnp.float32)]
    out, state = _triton_call()(*inputs, kernel=triton_kernels.lightning_scan, out_shape=out_shape,
                                grid=launch.grid, num_warps=launch.num_warps, num_stages=launch.num_stages,
                                name="lightning_scan", **launch.constexprs)
    return out, (state if want_state else None)


_causal = vjp.causal_lightning(_scan)
_bidirectional = vjp.bidirectional_lightning(_scan)


def lightning_attention(query, key, value, slopes=None, *, initial_state=None, is_causal=True, segment_ids=None,
                        blocks: tuple | None = None):
    """Same arguments and results as `pallas.lightning_attention` (without target/block_sizes/reduction);
    `blocks` optionally overrides `triton_launch.BLOCKS`. Returns `(out, final_state or None)`."""
    if initial_state is not None and not is_causal:
        raise ValueError("`initial_state` needs is_causal=True")
    if slopes is not None:
        slopes = jax.lax.stop_gradient(jnp.asarray(slopes, jnp.float32))
    docs = segments.document_ids(segments.check_segment_ids(segment_ids, query.shape[0], query.shape[1]))
    return _lightning(query, key, value, slopes, initial_state, docs,
                      _Static(None if blocks is None else tuple(blocks)), bool(is_causal))


def attention(query, key, value, slopes, initial_state, *, is_causal, block_size=None, segment_ids=None):
    """The `lightning_attention` backend signature (`block_size`, the 'xla' chunk, is not used; see `blocks`)."""
    del block_size
    return lightning_attention(query, key, value, slopes, initial_state=initial_state, is_causal=is_causal,
                               segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _lightning(query, key, value, slopes, initial_state, docs, static: _Static, is_causal: bool):
    if not is_causal:
        if slopes is None and docs is None:
            return vjp.bidirectional_no_decay(query, key, value), None
        return _bidirectional(query, key, value, slopes, docs, static), None
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    return _causal(query, key, value, slopes, initial_state, docs, static)
