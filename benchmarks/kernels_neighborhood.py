"""Neighborhood-attention section of `benchmarks/kernels.py`: the blocked XLA path against the fused Pallas kernel.

Shapes (bf16, B=8): NAT-style 2-D 56x56 k=7 with rpb (4 heads x 32), DiNAT-style 2-D 28x28 k=7 dilation 2
(8 x 32), 1-D T=8192 k=13 causal (8 x 64 heads, GQA 8/2); `--quick` keeps the first and the 1-D one.
Useful FLOPs count the two matmuls over the window only (4 B N tokens prod(k) H); the kernel also computes the
rounded-out halo, so its real arithmetic is higher. Forward + backward is `jax.vjp` of the output.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import jaxattn
from benchmarks.common import print_table, time_fn

SHAPES = {
    "2d_56x56_k7_rpb": dict(spatial=(56, 56), kernel=7, heads=4, kv_heads=4, head_dim=32, rpb=True),
    "2d_28x28_k7_d2": dict(spatial=(28, 28), kernel=7, dilation=2, heads=8, kv_heads=8, head_dim=32),
    "1d_8192_k13_causal_gqa": dict(spatial=(8192,), kernel=13, is_causal=True, heads=8, kv_heads=2, head_dim=64),
}
QUICK = ("2d_56x56_k7_rpb", "1d_8192_k13_causal_gqa")
INTERPRET = {"2d_12x12_k3_rpb": dict(spatial=(12, 12), kernel=3, heads=2, kv_heads=2, head_dim=16, rpb=True)}
COLUMNS = ["shape", "impl", "fwd_ms", "fwd_TFLOPs", "fwd_bwd_ms", "fwd_bwd_TFLOPs", "error"]


def _inputs(cfg, batch, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    spatial, n, k, h = cfg["spatial"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q = jax.random.normal(keys[0], (batch, *spatial, n, h), dtype)
    kk = jax.random.normal(keys[1], (batch, *spatial, k, h), dtype)
    v = jax.random.normal(keys[2], (batch, *spatial, k, h), dtype)
    rpb = None
    if cfg.get("rpb"):
        rpb = jax.random.normal(keys[3], (n,) + (2 * cfg["kernel"] - 1,) * len(spatial), jnp.float32)
    return q, kk, v, rpb


def rows(*, quick: bool, interpret: bool, repeats: int, batch: int = 8) -> list[dict]:
    shapes = INTERPRET if interpret else {name: SHAPES[name] for name in (QUICK if quick else SHAPES)}
    impls = ("xla", "pallas")
    dtype = jnp.float32 if interpret else jnp.bfloat16
    batch = 1 if interpret else batch
    out = []
    for name, cfg in shapes.items():
        q, k, v, rpb = _inputs(cfg, batch, dtype)
        opts = {key: cfg[key] for key in ("dilation", "is_causal") if key in cfg}
        window = cfg["kernel"] ** len(cfg["spatial"])
        flops = 4 * batch * cfg["heads"] * math.prod(cfg["spatial"]) * window * cfg["head_dim"]
        for impl in impls:
            fwd = functools.partial(_call, kernel_size=cfg["kernel"], implementation=impl, **opts)

            def fwd_bwd(q, k, v, rpb, fwd=fwd):
                out, vjp = jax.vjp(fwd, q, k, v, rpb)
                return vjp(out)

            row = {"shape": name, "impl": impl + ("(interpret)" if interpret and impl == "pallas" else "")}
            try:
                fwd_s = time_fn(fwd, q, k, v, rpb, repeats=repeats)
                fwd_bwd_s = time_fn(fwd_bwd, q, k, v, rpb, repeats=repeats)
            except Exception as err:  # a backend missing on this machine is a row
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            else:
                row.update(fwd_ms=1e3 * fwd_s, fwd_TFLOPs=flops / fwd_s / 1e12, fwd_bwd_ms=1e3 * fwd_bwd_s,
                           fwd_bwd_TFLOPs=3.5 * flops / fwd_bwd_s / 1e12)
            out.append(row)
            print_table([row], list(row))
    return out


def _call(q, k, v, rpb, *, kernel_size, implementation, **opts):
    return jaxattn.neighborhood_attention(q, k, v, kernel_size, rpb=rpb, implementation=implementation, **opts)
