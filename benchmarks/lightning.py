"""Lightning attention vs causal softmax attention: time per token and compiled memory over sequence length.

Lightning attention (chunked, 'xla') should cost the same per token at every length (the paper's "constant
speed"); causal softmax attention (`dot_product_attention`, 'xla') grows linearly per token. Prints a table, writes
`results/lightning.json` and `results/lightning.png` (both curves).

    python benchmarks/lightning.py                # T = 1k..64k, forward, fp32
    python benchmarks/lightning.py --backward     # forward + backward (value_and_grad)
    python benchmarks/lightning.py --quick        # smoke run: T = 1k..4k, one repeat
    python benchmarks/lightning.py --threads 1    # single-threaded XLA:CPU (steadier numbers on a shared CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--softmax-max-len", type=int, default=65536,
                   help="skip softmax attention above this length (it is quadratic)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64, help="lightning block size")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="XLA:CPU threads (1 = single-threaded)")
    p.add_argument("--quick", action="store_true", help="fast smoke run: T = 1k..4k, one repeat")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="what the table's main columns, the flatness check and the plot use: wall time (min of "
                        "repeats) or process CPU time (median; on a shared CPU machine the wall clock measures the "
                        "other jobs). auto = cpu on the CPU backend, wall elsewhere")
    p.add_argument("--out", default=None, help="path prefix, default results/lightning[_bwd]")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths = [n for n in args.lengths if n <= 4096][:3] or args.lengths[:1]
        args.repeats = 1
    if args.out is None:
        args.out = "results/lightning_bwd" if args.backward else "results/lightning"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads == 1:  # must be set before JAX starts
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxattn

    dtype = jnp.dtype(args.dtype)
    slopes = jaxattn.lightning_slopes(args.heads)
    impls = {
        "lightning": lambda q, k, v: jaxattn.lightning_attention(q, k, v, slopes=slopes, block_size=args.block,
                                                                 implementation="xla"),
        "softmax": lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        "lightning_naive": lambda q, k, v: jaxattn.lightning_attention(q, k, v, slopes=slopes,
                                                                       implementation="reference"),
    }

    def program(fn):
        if not args.backward:
            return jax.jit(fn)
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    def temp_mb(fn, spec):
        stats = program(fn).lower(spec, spec, spec).compile().memory_analysis()
        return None if stats is None else stats.temp_size_in_bytes / 2 ** 20

    def timed(fn, x):
        f = program(fn)
        jax.block_until_ready(f(x, x, x))  # compile + warm up
        walls, cpus = [], []
        for _ in range(args.repeats):
            w, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(x, x, x))
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        return min(walls), statistics.median(cpus)

    rows = []
    mode = "fwd+bwd" if args.backward else "fwd"
    clock = args.clock if args.clock != "auto" else ("cpu" if jax.default_backend() == "cpu" else "wall")
    key = "cpu_us_per_token" if clock == "cpu" else "us_per_token"
    print(f"{jax.devices()[0].platform} | batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
          f"{args.dtype}, {mode}, lightning block {args.block} | time per token in microseconds by the {clock} "
          f"clock ({'median process CPU time' if clock == 'cpu' else 'min wall time'} of {args.repeats}); "
          f"compiled temporaries in MiB")
    header = (f"{'T':>7} | {'lightning us/tok':>16} {'temp MiB':>9} | {'softmax us/tok':>14} {'temp MiB':>9} | "
              f"{'lightning faster':>16} | {'naive lightning MiB':>19}")
    print(header)
    print("-" * len(header))
    for t in args.lengths:
        x = jnp.asarray(np.random.default_rng(t).standard_normal((args.batch, t, args.heads, args.head_dim),
                                                                  np.float32) * 0.1).astype(dtype)
        spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
        tokens = args.batch * t
        row = {"T": t}
        for name in ("lightning", "softmax"):
            if name == "softmax" and t > args.softmax_max_len:
                continue
            wall, cpu = timed(impls[name], x)
            row.update({f"{name}_us_per_token": wall / tokens * 1e6, f"{name}_cpu_us_per_token": cpu / tokens * 1e6,
                        f"{name}_temp_mib": temp_mb(impls[name], spec)})
        row["lightning_naive_temp_mib"] = temp_mb(impls["lightning_naive"], spec)
        rows.append(row)
        light, soft = row[f"lightning_{key}"], row.get(f"softmax_{key}")
        print(f"{t:>7} | {light:>16.3f} {row['lightning_temp_mib']:>9.1f} | "
              + (f"{soft:>14.3f} {row['softmax_temp_mib']:>9.1f} | {soft / light:>15.1f}x"
                 if soft is not None else f"{'skipped':>14} {'':>9} | {'':>16}")
              + f" | {row['lightning_naive_temp_mib']:>19.1f}", flush=True)

    per_token = [r[f"lightning_{key}"] for r in rows]
    flatness = max(per_token) / min(per_token)
    print(f"lightning time per token ({clock} clock), max/min over T = {rows[0]['T']}..{rows[-1]['T']}: "
          f"{flatness:.2f}x ({'flat' if flatness <= 1.5 else 'NOT flat'} within 1.5x)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "mode": mode,
              "platform": jax.devices()[0].platform, "device": str(jax.devices()[0]), "rows": rows,
              "clock": clock, "lightning_max_over_min": flatness}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, args, mode, key, clock, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return result


def plot(rows, args, mode, key, clock, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["T"] for r in rows], [r[f"lightning_{key}"] for r in rows], "o-", label="lightning (xla)")
    sm = [r for r in rows if f"softmax_{key}" in r]
    ax.plot([r["T"] for r in sm], [r[f"softmax_{key}"] for r in sm], "s-", label="causal softmax (xla)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(f"time per token (us, {clock} clock)")
    ax.set_title(f"{mode}, B={args.batch} N={args.heads} H={args.head_dim} {args.dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
