"""Position encodings that take absolute positions (so a decode step at offset `pos` matches the full sequence)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def positions(pos, length: int) -> jax.Array:
    """Absolute positions `[length]` of tokens starting at `pos` (int or traced int32 scalar)."""
    return jnp.asarray(pos, jnp.int32) + jnp.arange(length, dtype=jnp.int32)


def lrpe(x: jax.Array, theta: jax.Array, pos) -> jax.Array:
    """LRPE (TransNormerLLM layer 0): `[x cos(theta t), x sin(theta t)]`, doubling the head dim.

    x: `[B, T, N, H]`; theta: `[N, H]` (learnable angles); pos: position of token 0. Returns `[B, T, N, 2H]`.
    Since `cos(a)cos(b) + sin(a)sin(b) = cos(a - b)`, `q_t . k_s` only sees the relative offset `t - s`.
    """
    t = positions(pos, x.shape[1]).astype(jnp.float32)
    # theta broadcast to the whole batch first: its gradient is then one reduction over (batch, time), local on
    # each device of a batch-sharded mesh before a [N, H] all-reduce (not a [T, N, H] all-reduce over batch).
    angle = t[None, :, None, None] * jnp.broadcast_to(theta.astype(jnp.float32), x.shape)  # [B, T, N, H]
    x32 = x.astype(jnp.float32)
    return jnp.concatenate([x32 * jnp.cos(angle), x32 * jnp.sin(angle)], axis=-1).astype(x.dtype)


def apply_rotary(x: jax.Array, pos, base: float = 10000.0) -> jax.Array:
    """Rotary embedding (rotate-half layout as in GPT-NeoX/LLaMA-HF) of `x [B, T, N, H]` (H even) at `pos + t`."""
    h = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
    angle = positions(pos, x.shape[1]).astype(jnp.float32)[:, None] * inv_freq[None]  # [T, H/2]
    cos = jnp.concatenate([jnp.cos(angle)] * 2, -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angle)] * 2, -1)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    half = jnp.concatenate([-x32[..., h // 2:], x32[..., : h // 2]], axis=-1)
    return (x32 * cos + half * sin).astype(x.dtype)
