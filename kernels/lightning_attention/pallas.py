"""Lightning attention as Pallas kernels for TPU (Mosaic) and GPU (the Pallas-Triton lowering).

`lightning_attention` converts the op's heads-last arrays to the kernels' layout (heads-major, rows padded with
zeros to whole blocks, features padded to powers of two for Triton; plain XLA that differentiates itself) and
runs the scans of `pallas_scan.py` through the custom VJP of `vjp.py`: one scan forward, three backward.
Supported: causal with or without decay, an initial state and the final state (both differentiable), any length,
any head dims; bidirectional with decay (two scans; without decay it is `q (K^T V)` in XLA); packed documents
(`segment_ids`, both forms: the masks of `jaxattn.core.segments` inside the scans). Not supported: Mosaic
GPU (the kernel body uses `jnp.dot` on register values, as the flash-attention kernels do); GPUs run the
Pallas-Triton lowering here, or the Triton kernel (`triton.py`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.core import blocking, segments
from jaxattn.kernels.common import blocks as common_blocks
from jaxattn.kernels.common import platform
from jaxattn.kernels.lightning_attention import blocks, pallas_scan, vjp
from jaxattn.kernels.lightning_attention.blocks import BlockSizes
from jaxattn.kernels.lightning_attention.pallas_scan import ScanStatic

_causal = vjp.causal_lightning(pallas_scan.scan)
_bidirectional = vjp.bidirectional_lightning(pallas_scan.scan)


@platform.lowering_target
def lightning_attention(query, key, value, slopes=None, *, initial_state=None, is_causal=True, segment_ids=None,
                        target=None, block_sizes: BlockSizes | None = None, reduction: str | None = None):
    """Lightning attention with the Pallas kernels. Returns `(out [B, T, N, Hv], final_state [B, N, H, Hv] fp32)`
    (state None when not causal). Semantics: `jaxattn.lightning_attention`.

    Args:
      query, key `[B, T, N, H]`, value `[B, T, N, Hv]` (T >= 1); slopes `[N]` (no gradient) or None;
      initial_state `[B, N, H, Hv]` (causal only); segment_ids `[B, T]` integer or None (packed documents).
      target: 'tpu', 'triton', 'interpret' or 'tpu_interpret' (default: the platform the program is lowered for).
      block_sizes: rows per scan step and state columns per program (default per target, `blocks.py`).
      reduction: 'grid' or 'fori' (default 'grid' on TPU, 'fori' elsewhere; Triton needs 'fori').
    """
    target = platform.resolve_target(target)
    mode = reduction or ("grid" if platform.tpu_like(target) else "fori")
    if target == "tpu" and mode != "grid":
        raise ValueError("target='tpu' walks the blocks on the grid (reduction='grid'); 'fori' would keep whole "
                         "sequences in VMEM")
    if initial_state is not None and not is_causal:
        raise ValueError("`initial_state` needs is_causal=True")
    t = query.shape[1]
    static = ScanStatic(t, blocks.fit(target, t, block_sizes, head_dim=max(query.shape[3], value.shape[3])),
                        target, mode)
    if slopes is not None:
        slopes = jax.lax.stop_gradient(jnp.asarray(slopes, jnp.float32))
    docs = segments.document_ids(segments.check_segment_ids(segment_ids, query.shape[0], t))
    return _lightning(query, key, value, slopes, initial_state, docs, static, bool(is_causal))


def attention(query, key, value, slopes, initial_state, *, is_causal, block_size=None, segment_ids=None,
              target=None):
    """The `lightning_attention` backend signature. `block_size` (the 'xla' path's chunk) is not used: the kernels
    choose their blocks per platform (`blocks.py`; pass `block_sizes` to `lightning_attention` here to override)."""
    del block_size
    return lightning_attention(query, key, value, slopes, initial_state=initial_state, is_causal=is_causal,
                               segment_ids=segment_ids, target=target)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _lightning(query, key, value, slopes, initial_state, docs, static: ScanStatic, is_causal: bool):
    if not is_causal and slopes is None and docs is None:
        return vjp.bidirectional_no_decay(query, key, value), None
    _, t, _, h = query.shape
    hv = value.shape[-1]
    tp = common_blocks.padded_length(t, static.sizes.block)
    hp, hvp = blocks.feature_dim(h, static.target), blocks.feature_dim(hv, static.target)
    q, k, v = _kernel_layout(query, tp, hp), _kernel_layout(key, tp, hp), _kernel_layout(value, tp, hvp)
    docs = None if docs is None else segments.pad_documents(docs, tp)
    if not is_causal:
        out, state = _bidirectional(q, k, v, slopes, docs, static), None
    else:
        if initial_state is not None:
            initial_state = blocking.pad_axis(blocking.pad_axis(initial_state.astype(jnp.float32), 2, hp), 3, hvp)
        out, state = _causal(q, k, v, slopes, initial_state, docs, static)
        state = state[:, :, :h, :hv]
    return jnp.swapaxes(out, 1, 2)[:, :t, :, :hv], state


def _kernel_layout(x, length, dim):
    """`[B, T, N, D]` -> `[B, N, Tp, Dp]`, zero padded: padded rows add nothing to any state and are dropped,
    padded features add zero to every dot product."""
    x = jnp.swapaxes(x, 1, 2)
    return blocking.pad_axis(blocking.pad_axis(x, 2, length), 3, dim)
