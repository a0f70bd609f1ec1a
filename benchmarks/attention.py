"""Dot-product attention: time and peak memory of `reference` (materialised logits) vs `xla` (blocked).

    python benchmarks/attention.py            # T = 1k, 2k, 4k, 8k, 16k (causal self-attention)
    python benchmarks/attention.py --quick    # T = 256, 512

Peak memory is what XLA plans for the compiled function (`memory_analysis()`: arguments + outputs +
temporaries), measured for the forward pass and for forward+backward (`jax.vjp`). Time is the median wall time of
the jitted call. Results: printed table and results/attention.json.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import jaxattn
from benchmarks.common import compiled_memory, mib, print_table, time_fn, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-backward", action="store_true", help="skip forward+backward timing")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    lengths = [256, 512] if args.quick else args.lengths
    rows = []
    for t in lengths:
        keys = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(keys[0], (args.batch, t, args.heads, args.head_dim), jnp.float32)
        k = jax.random.normal(keys[1], (args.batch, t, args.kv_heads, args.head_dim), jnp.float32)
        v = jax.random.normal(keys[2], (args.batch, t, args.kv_heads, args.head_dim), jnp.float32)
        for impl in ("reference", "xla"):
            fwd = functools.partial(jaxattn.dot_product_attention, is_causal=True, implementation=impl)

            def fwd_bwd(q, k, v, fwd=fwd):
                out, vjp = jax.vjp(fwd, q, k, v)
                return vjp(out)

            row = {"T": t, "impl": impl}
            row["fwd_ms"] = 1e3 * time_fn(fwd, q, k, v)
            row["fwd_peak_MiB"] = mib(compiled_memory(fwd, q, k, v)["peak_bytes"])
            row["fwd_bwd_peak_MiB"] = mib(compiled_memory(fwd_bwd, q, k, v)["peak_bytes"])
            if not args.no_backward:
                row["fwd_bwd_ms"] = 1e3 * time_fn(fwd_bwd, q, k, v, repeats=1)
            rows.append(row)
            print_table([row], list(row))
    for t in lengths:
        ref, xla = (next(r for r in rows if r["T"] == t and r["impl"] == i) for i in ("reference", "xla"))
        ref["xla_memory_saving"] = xla["xla_memory_saving"] = ref["fwd_peak_MiB"] / xla["fwd_peak_MiB"]
    print()
    print_table(rows, list(rows[-1]))
    write_json("attention", {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
