"""Vision ops: halo, MaxViT block/grid and BiFormer bi-level routing attention, `reference` vs `xla`.

    python benchmarks/vision_ops.py            # model-like shapes (below), batch 1
    python benchmarks/vision_ops.py --quick    # one small shape per op, batch 1

- halo: HaloNet-like stages (block 8, halo 3 / 2, 8 heads), stride 1 and stride 2 (queries subsampled);
  `reference` is the literal timm computation (gathered windows, materialised relative logits).
- block / grid: MaxViT-T stages 1-3 (56/28/14 px, 32-dim heads, p = g = 7).
- routing: BiFormer-T stage-1-like (C = 64, 2 heads, n_win 7) at 56x56 and 112x112, topk 1..16; `reference` is the
  official gather-based form (k-fold k/v copies), `xla` the scan over routed regions.

Peak memory is what XLA plans for the compiled function (`memory_analysis()`: arguments + outputs + temporaries)
for the forward pass and for forward+backward (`jax.vjp`), on the backend it runs on. Time is the median wall time
of the jitted call (fp32), best of a few runs: on a shared CPU the minimum is the least noisy estimate.
Results: printed table and results/vision_ops.json.
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
import numpy as np

import jaxattn
from benchmarks.common import compiled_memory, mib, print_table, time_fn, write_json

COLUMNS = ["op", "shape", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_peak_MiB", "fwd_bwd_peak_MiB"]


def _randn(seed, *shapes):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes)


def _best_ms(fn, inputs, runs):
    time_fn(fn, *inputs, repeats=1)  # compile and warm up once
    return 1e3 * min(time_fn(fn, *inputs, repeats=1, warmup=0) for _ in range(runs))


def _measure(op, shape, impl, fn, inputs, backward=True):
    def fwd_bwd(*args):
        out, vjp = jax.vjp(fn, *args)
        return vjp(out)

    row = {"op": op, "shape": shape, "impl": impl}
    row["fwd_ms"] = _best_ms(fn, inputs, runs=5)
    row["fwd_peak_MiB"] = mib(compiled_memory(fn, *inputs)["peak_bytes"])
    row["fwd_bwd_peak_MiB"] = mib(compiled_memory(fwd_bwd, *inputs)["peak_bytes"])
    if backward:
        row["fwd_bwd_ms"] = _best_ms(fwd_bwd, inputs, runs=3)
    print_table([row], COLUMNS)
    return row


def halo_rows(batch, quick, backward):
    configs = [(32, 32, 8, 16, 8, 3, 1)] if quick else [  # (H, W, heads, head_dim, block, halo, stride)
        (64, 64, 8, 8, 8, 3, 1), (64, 64, 8, 16, 8, 3, 2), (32, 32, 8, 16, 8, 3, 1), (16, 16, 8, 32, 8, 2, 1)]
    rows = []
    for h, w, n, d, block, halo, stride in configs:
        win = 2 * (block + 2 * halo) - 1
        inputs = _randn(0, (batch, h // stride, w // stride, n, d), (batch, h, w, n, d), (batch, h, w, n, d),
                        (win, d), (win, d))
        shape = f"{batch}x{h}x{w}x{n}x{d} b{block} h{halo} s{stride}"
        for impl in ("reference", "xla"):
            fn = functools.partial(_halo, block=block, halo=halo, stride=stride, impl=impl)
            rows.append(_measure("halo", shape, impl, fn, inputs, backward))
    return rows


def _halo(q, k, v, rh, rw, *, block, halo, stride, impl):
    return jaxattn.halo_attention(q, k, v, block, halo, rel_height=rh, rel_width=rw, query_stride=stride,
                                  implementation=impl)


def multi_axis_rows(batch, quick, backward):
    configs = [(56, 2)] if quick else [(56, 2), (28, 4), (14, 8)]  # MaxViT-T stages 1-3: (size, heads)
    rows = []
    for size, n in configs:
        inputs = _randn(1, *[(batch, size, size, n, 32)] * 3, (n, 49, 49))
        for op in ("block", "grid"):
            for impl in ("reference", "xla"):
                fn = functools.partial(_multi_axis, op=op, impl=impl)
                rows.append(_measure(op, f"{batch}x{size}x{size}x{n}x32 p7", impl, fn, inputs, backward))
    return rows


def _multi_axis(q, k, v, bias, *, op, impl):
    return getattr(jaxattn, f"{op}_attention")(q, k, v, 7, bias=bias, implementation=impl)


def routing_rows(batch, quick, backward):
    sizes, topks = ([56], [1, 4]) if quick else ([56, 112], [1, 4, 8, 16])
    rows = []
    for size in sizes:
        inputs = _randn(2, *[(batch, size, size, 2, 32)] * 3)
        for topk in topks:
            for impl in ("reference", "xla"):
                fn = functools.partial(_routing, topk=topk, impl=impl)
                row = _measure("routing", f"{batch}x{size}x{size}x2x32 n7 k{topk}", impl, fn, inputs, backward)
                rows.append({**row, "topk": topk, "size": size})
    for row in rows:
        if row["impl"] == "xla":
            gather = next(r for r in rows if r["impl"] == "reference" and r["shape"] == row["shape"])
            row["fwd_bwd_memory_saving"] = gather["fwd_bwd_peak_MiB"] / row["fwd_bwd_peak_MiB"]
    return rows


def _routing(q, k, v, *, topk, impl):
    return jaxattn.bilevel_routing_attention(q, k, v, 7, topk, implementation=impl)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ops", nargs="*", default=["halo", "multi_axis", "routing"])
    parser.add_argument("--no-backward", action="store_true", help="skip forward+backward timing")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    batch = 1 if args.quick else args.batch
    makers = {"halo": halo_rows, "multi_axis": multi_axis_rows, "routing": routing_rows}
    rows = []
    for name in args.ops:
        rows += makers[name](batch, args.quick, not args.no_backward)
    print()
    print_table(rows, COLUMNS + ["fwd_bwd_memory_saving"])
    write_json("vision_ops", {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
