"""Neighborhood-attention section of `benchmarks/kernels.py`: the blocked XLA path against the fused Pallas kernel,
and the logits each kernel plan computes against the logits the windows need.

Timing shapes (bf16, B=8): NAT-style 2-D 56x56 k=7 with rpb (4 heads x 32), DiNAT-style 2-D 28x28 k=7 dilation 2
(8 x 32), 1-D T=8192 k=13 causal (8 x 64 heads, GQA 8/2); `--quick` keeps the first and the 1-D one.
Useful FLOPs count the two matmuls over the window only (4 B N tokens prod(k) H); the kernel also computes the
rest of its tiles, so its real arithmetic is higher. Forward + backward is `jax.vjp` of the output.

Waste (`waste_rows`, counted from the kernels' walk tables, no hardware needed): per shape and plan (TPU v4, v5e,
v5p, v6e; GPU), the tiles `blocks.fit` picks, logits computed per query (every visited `block_q x block_k` tile,
padded rows included) and needed per query (the real queries' windows), their ratio, the grid steps per batch row
and head, the ratio of the plan this branch replaced (`OLD`), and the floor: the fewest logits at the smallest
tiles the target accepts (8 x 8 on TPU, where an 8-key box still fills whole 128-lane vregs, hence also the
lane-padded ratio; 16 x 16 on GPU).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import jaxattn
from benchmarks.common import print_table, time_fn
from jaxattn.core import neighborhood_windows as windows
from jaxattn.kernels.neighborhood_attention import blocks
from jaxattn.kernels.neighborhood_attention.geometry import Geometry

SHAPES = {
    "2d_56x56_k7_rpb": dict(spatial=(56, 56), kernel=7, heads=4, kv_heads=4, head_dim=32, rpb=True),
    "2d_28x28_k7_d2": dict(spatial=(28, 28), kernel=7, dilation=2, heads=8, kv_heads=8, head_dim=32),
    "1d_8192_k13_causal_gqa": dict(spatial=(8192,), kernel=13, is_causal=True, heads=8, kv_heads=2, head_dim=64),
}
QUICK = ("2d_56x56_k7_rpb", "1d_8192_k13_causal_gqa")
INTERPRET = {"2d_12x12_k3_rpb": dict(spatial=(12, 12), kernel=3, heads=2, kv_heads=2, head_dim=16, rpb=True)}
COLUMNS = ["shape", "impl", "fwd_ms", "fwd_TFLOPs", "fwd_bwd_ms", "fwd_bwd_TFLOPs", "error"]

# name: (spatial, kernel, dilation, causal)
WASTE_SHAPES = {
    "2d_56x56_k7": ((56, 56), 7, 1, False),
    "1d_8192_k13": ((8192,), 13, 1, False),
    "3d_16x16x16_k3": ((16, 16, 16), 3, 1, False),
    "1d_8192_k13_causal": ((8192,), 13, 1, True),
    "2d_56x56_k7_d2": ((56, 56), 7, 2, False),
    "2d_28x28_k7_d2": ((28, 28), 7, 2, False),
}
PLANS = {"tpu-v4": ("tpu", "v4"), "tpu-v5e": ("tpu", "v5e"), "tpu-v5p": ("tpu", "v5p"), "tpu-v6e": ("tpu", "v6e"),
         "gpu": ("triton", None)}
FLOOR_ROWS = {"tpu": 8, "triton": 16}
TPU_LANES = 128
# computed / needed logits of the plan before query tiles and key boxes were decoupled (main at 97b3c1c: one box
# size for both, 8x16 / 128 / 4x4x8 on TPU and 4x8 / 32 / 2x4x4 on GPU, key boxes from one band for all tiles)
OLD = {
    "2d_56x56_k7": {"tpu": 20.26, "triton": 8.10}, "1d_8192_k13": {"tpu": 29.23, "triton": 7.37},
    "3d_16x16x16_k3": {"tpu": 59.26, "triton": 20.37}, "1d_8192_k13_causal": {"tpu": 19.55, "triton": 4.92},
    "2d_56x56_k7_d2": {"tpu": 17.06, "triton": 7.73}, "2d_28x28_k7_d2": {"tpu": 6.82, "triton": 5.97},
}
WASTE_COLUMNS = ["shape", "plan", "tiles", "key_tiles", "logits_per_query", "needed_per_query", "ratio",
                 "old_ratio", "grid_steps", "floor_tiles", "floor_ratio", "floor_ratio_lanes128"]


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


def waste_rows() -> list[dict]:
    """Computed/needed logits per shape and kernel plan (see the module docstring)."""
    out = []
    for name, (spatial, kernel, dilation, causal) in WASTE_SHAPES.items():
        nd = len(spatial)
        spec = windows.NASpec((kernel,) * nd, (dilation,) * nd, (1,) * nd, (causal,) * nd)

        def geometry(tiles):
            return Geometry(1, spatial, 1, 1, spec.kernel_size, spec.dilation, spec.stride, spec.is_causal, *tiles)

        for plan, (target, generation) in PLANS.items():
            geo = geometry(blocks.fit(target, spatial, spec, generation=generation))
            floor = geometry(blocks.best_tiles(target, spatial, spec, FLOOR_ROWS[target]))
            queries = math.prod(spatial)
            walk, _ = geo.keys_of_queries()
            row = dict(shape=name, plan=plan, tiles=geo.query_tiles, key_tiles=geo.key_tiles,
                       logits_per_query=geo.computed_logits / queries, needed_per_query=geo.needed_logits / queries,
                       ratio=geo.computed_logits / geo.needed_logits, old_ratio=OLD[name][target],
                       grid_steps=geo.num_query_tiles * walk.steps * geo.groups,
                       floor_tiles=(floor.query_tiles, floor.key_tiles),
                       floor_ratio=floor.computed_logits / floor.needed_logits)
            if target == "tpu":
                row["floor_ratio_lanes128"] = row["floor_ratio"] * -(-floor.block_k // TPU_LANES) * TPU_LANES \
                    / floor.block_k
            out.append(row)
    return out
