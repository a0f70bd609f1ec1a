"""GPU section of `benchmarks/kernels.py`: each GPU flash-attention kernel against cuDNN's.

For every case (causal and full; MHA 16/16 and GQA 16/4 heads; head dim 64 and 128; bf16, B=4, T from
`--lengths`) the rows time `jax.nn.dot_product_attention(implementation='cudnn')` and jaxattn's GPU kernels
through the public op (`implementation='pallas'`: the Pallas-Triton lowering; `'triton'`: the Triton kernel via
jax-triton), forward and forward + backward (`jax.vjp` of the output), and give each kernel's TFLOP/s over
cuDNN's (`fwd_vs_cudnn`, `fwd_bwd_vs_cudnn`). FLOPs count the two attention matmuls, `4 B N T S H`, halved when
causal; the backward counts 2.5x the forward. A kernel or cuDNN that does not run a case is a row with `error`.

Without a GPU the rows are the cases with `status` saying that the column needs a GPU (printed, and written to
results/kernels.json under "cudnn") so the script is ready for the first time a GPU is at hand.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

import jaxattn
from benchmarks.common import print_table, time_fn

# name: (heads, kv_heads)
HEADS = {"mha": (16, 16), "gqa": (16, 4)}
HEAD_DIMS = (64, 128)
KERNELS = ("pallas", "triton")
BASELINE = "jax.nn-cudnn"
COLUMNS = ["T", "causal", "heads", "head_dim", "impl", "fwd_ms", "fwd_TFLOPs", "fwd_vs_cudnn", "fwd_bwd_ms",
           "fwd_bwd_TFLOPs", "fwd_bwd_vs_cudnn", "status", "error"]
BACKWARD_FACTOR = 2.5


def cases(lengths, quick: bool = False):
    """`(T, causal, heads name, head dim)` of every comparison (`quick`: causal GQA d=128 only)."""
    if quick:
        return [(t, True, "gqa", 128) for t in lengths]
    return list(itertools.product(lengths, (True, False), tuple(HEADS), HEAD_DIMS))


def _attention(impl: str):
    if impl == BASELINE:
        return lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                    implementation="cudnn")
    return lambda q, k, v, causal: jaxattn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def flops(batch, heads, t, head_dim, causal) -> float:
    """The two attention matmuls of a forward (`4 B N T T H`), halved when causal."""
    return 4 * batch * heads * t * t * head_dim * (0.5 if causal else 1.0)


def time_fwd_and_bwd(fn, q, k, v, causal, repeats):
    """Median seconds of `fn(q, k, v, causal)` and of `jax.vjp` of it (forward + backward)."""
    fwd = functools.partial(fn, causal=causal)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fwd, q, k, v)
        return vjp(out)

    return time_fn(fwd, q, k, v, repeats=repeats), time_fn(fwd_bwd, q, k, v, repeats=repeats)


def rows(lengths, *, batch: int = 4, repeats: int = 5, quick: bool = False) -> list[dict]:
    """The comparison rows; without a GPU, the cases marked as needing one (nothing is timed)."""
    on_gpu = jax.default_backend() == "gpu"
    out = []
    for t, causal, heads_name, head_dim in cases(lengths, quick):
        n, kv = HEADS[heads_name]
        case = {"T": t, "causal": causal, "heads": f"{n}/{kv}", "head_dim": head_dim}
        if not on_gpu:
            out.append(dict(case, impl=",".join((BASELINE, *KERNELS)), status="needs a GPU"))
            continue
        keys = jax.random.split(jax.random.key(t + head_dim), 3)
        q = jax.random.normal(keys[0], (batch, t, n, head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, t, kv, head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, t, kv, head_dim), jnp.bfloat16)
        work = flops(batch, n, t, head_dim, causal)
        group = []
        for impl in (BASELINE, *KERNELS):
            row = dict(case, impl=impl)
            try:
                fwd_s, fwd_bwd_s = time_fwd_and_bwd(_attention(impl), q, k, v, causal, repeats)
            except Exception as err:  # cuDNN or a kernel that does not take this case is a row
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            else:
                row.update(fwd_ms=1e3 * fwd_s, fwd_TFLOPs=work / fwd_s / 1e12, fwd_bwd_ms=1e3 * fwd_bwd_s,
                           fwd_bwd_TFLOPs=(1 + BACKWARD_FACTOR) * work / fwd_bwd_s / 1e12)
            group.append(row)
        base = group[0]
        for row in group[1:]:
            for key in ("fwd", "fwd_bwd"):
                if f"{key}_TFLOPs" in row and f"{key}_TFLOPs" in base:
                    row[f"{key}_vs_cudnn"] = row[f"{key}_TFLOPs"] / base[f"{key}_TFLOPs"]
        print_table(group, COLUMNS)
        out += group
    return out
