"""Neighborhood attention: the blocked XLA path against dense masked attention (and the brute-force reference).

    python benchmarks/neighborhood.py            # 2-D 128x128 and 64x64 tokens, kernel 7, B=1, heads 4, head_dim 32
    python benchmarks/neighborhood.py --quick    # 2-D 48x48, smoke run

`dense` is ordinary softmax attention over all `n = H*W` tokens with the neighborhood as an `n x n` boolean mask
(`jax.nn.dot_product_attention(..., mask=..., implementation='xla')`): what one would write without this op. The
mask is built once beforehand and passed in, so neither its construction nor its memory is charged to dense.
`reference` is the brute-force path (copies k/v once per window slot); `xla` is the default CPU path. Dense
passes that would plan more than 10 GiB are compiled (for their memory) but not run: at 128x128 that is dense
forward+backward, so the 64x64 comparison gives the forward+backward time ratio.

Memory, two ways, both honest about what they count:
- `peak_MiB`: bytes XLA plans for the compiled function beyond its inputs, i.e. `memory_analysis()` temporaries
  + outputs, for the forward and for forward+backward (`jax.vjp`, cotangent = output).
- `rss_MiB` (forward only; off with `--no-rss`): in a fresh subprocess that already holds its inputs, the growth
  of the process's peak resident set (`VmHWM`) over compiling the forward and running it twice. It includes
  the compiler's own memory and allocator overhead, so it is an upper bound (generous to dense, whose buffers
  dwarf the compiler; pessimistic for xla).
Time: median wall ms of the jitted call after warm-up (the 2-core machine is shared, so expect noise).
The outputs of all paths are checked against each other before timing. Extra rows time the xla path on other
shapes (1-D, 3-D, dilation, rpb). Results: printed table and results/neighborhood.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from benchmarks.common import compiled_memory, mib, print_table, time_fn, write_json
from jaxattn.core import neighborhood_windows as windows
from jaxattn.neighborhood import reference

DENSE_LIMIT_BYTES = 10 * 2 ** 30  # do not execute a dense pass that plans more than this (shared 24 GiB machine)


def _inputs(shape, heads, head_dim, kernel, with_rpb, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (1, *shape, heads, head_dim), jnp.float32) for kk in keys[:3])
    rpb = jax.random.normal(keys[3], (heads, *[2 * kernel - 1] * len(shape)), jnp.float32) if with_rpb else None
    return q, k, v, rpb


def _functions(shape, kernel, dilation):
    """`{name: (forward, extra_args)}`: each path as `forward(q, k, v, *extra_args) -> out`."""
    nd = len(shape)
    spec = windows.NASpec((kernel,) * nd, (dilation,) * nd, (1,) * nd, (False,) * nd)
    flat_keys, valid, _ = reference._tables(tuple(shape), spec)
    n = int(np.prod(shape))
    # The n x n mask is an input of `dense`, built beforehand: its construction and its own 1 byte per entry are
    # left out of dense's time and planned memory (generous to dense).
    mask = jax.jit(lambda keys, valid: jnp.zeros((n, n), bool).at[jnp.arange(n)[:, None], keys].max(valid))(
        flat_keys, valid)

    def dense(q, k, v, mask):
        b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
        out = jax.nn.dot_product_attention(q.reshape(b, n, h, d), k.reshape(b, n, h, d), v.reshape(b, n, h, d),
                                           mask=mask[None, None], implementation="xla")
        return out.reshape(q.shape)

    def na(impl):
        return lambda q, k, v: jaxattn.neighborhood_attention(q, k, v, kernel, dilation=dilation, implementation=impl)

    return {"dense": (dense, (mask,)), "reference": (na("reference"), ()), "xla": (na("xla"), ())}


def _fwd_bwd(fwd):
    """Forward + backward (`jax.vjp` with the output as cotangent) w.r.t. q, k, v."""
    def run(q, k, v, *extra):
        out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, *extra), q, k, v)
        return vjp(out)
    return run


def _planned(fn, *args):
    m = compiled_memory(fn, *args)
    return m["temp_bytes"] + m["output_bytes"]


def _peak_rss() -> int:
    """This process's peak resident set in bytes (`VmHWM`; unlike `ru_maxrss` it is not inherited over fork)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _rss_child(payload: str) -> None:
    """Runs in a subprocess: prints the peak-RSS growth (bytes) over compiling one forward and running it twice."""
    cfg = json.loads(payload)
    q, k, v, _ = _inputs(tuple(cfg["shape"]), cfg["heads"], cfg["head_dim"], cfg["kernel"], False)
    fn, extra = _functions(tuple(cfg["shape"]), cfg["kernel"], cfg["dilation"])[cfg["impl"]]
    jax.block_until_ready((q, k, v, extra))
    before = _peak_rss()
    compiled = jax.jit(fn).trace(q, k, v, *extra).lower().compile()
    for _ in range(2):
        jax.block_until_ready(compiled(q, k, v, *extra))
    after = _peak_rss()
    print(json.dumps({"rss_growth_bytes": after - before}))


def _rss(cfg: dict) -> float | None:
    proc = subprocess.run([sys.executable, __file__, "--_rss-child", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return mib(json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth_bytes"])


def compare(shape, kernel, dilation, heads, head_dim, repeats, rss, backward):
    q, k, v, _ = _inputs(shape, heads, head_dim, kernel, False)
    fns = _functions(shape, kernel, dilation)
    planned = {name: _planned(fn, q, k, v, *extra) for name, (fn, extra) in fns.items()}
    outs = {name: jax.jit(fn)(q, k, v, *extra) for name, (fn, extra) in fns.items()
            if planned[name] < DENSE_LIMIT_BYTES}
    for name, out in outs.items():
        err = float(jnp.max(jnp.abs(out - outs["xla"])))
        assert err < 1e-4, f"{name} differs from xla by {err}"
    rows = []
    for name, (fn, extra) in fns.items():
        row = {"shape": "x".join(map(str, shape)), "kernel": kernel, "dilation": dilation, "impl": name}
        row["fwd_peak_MiB"] = mib(planned[name])
        runnable = name in outs
        row["fwd_ms"] = 1e3 * time_fn(fn, q, k, v, *extra, repeats=repeats) if runnable else None
        if backward:
            bwd_bytes = _planned(_fwd_bwd(fn), q, k, v, *extra)
            row["fwd_bwd_peak_MiB"] = mib(bwd_bytes)
            row["fwd_bwd_ms"] = (1e3 * time_fn(_fwd_bwd(fn), q, k, v, *extra, repeats=repeats)
                                 if bwd_bytes < DENSE_LIMIT_BYTES else None)
        if rss and runnable:
            row["fwd_rss_MiB"] = _rss({"shape": list(shape), "kernel": kernel, "dilation": dilation,
                                       "heads": heads, "head_dim": head_dim, "impl": name})
        rows.append(row)
        print_table([row], list(row))
    return rows


def scaling(cases, heads, head_dim, repeats):
    """The xla path alone on other shapes: forward and forward+backward time, planned memory."""
    rows = []
    for shape, kernel, dilation, with_rpb in cases:
        q, k, v, rpb = _inputs(shape, heads, head_dim, kernel, with_rpb)

        def fwd(q, k, v, rpb=rpb):
            return jaxattn.neighborhood_attention(q, k, v, kernel, dilation=dilation, rpb=rpb, implementation="xla")

        row = {"shape": "x".join(map(str, shape)), "kernel": kernel, "dilation": dilation, "rpb": with_rpb,
               "fwd_ms": 1e3 * time_fn(fwd, q, k, v, repeats=repeats),
               "fwd_bwd_ms": 1e3 * time_fn(_fwd_bwd(fwd), q, k, v, repeats=repeats),
               "fwd_peak_MiB": mib(_planned(fwd, q, k, v)),
               "fwd_bwd_peak_MiB": mib(_planned(_fwd_bwd(fwd), q, k, v))}
        rows.append(row)
        print_table([row], list(row))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 64], help="2-D inputs of size x size tokens")
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--dilation", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurement")
    parser.add_argument("--no-backward", action="store_true", help="skip forward+backward")
    parser.add_argument("--no-scaling", action="store_true", help="skip the extra xla-only shapes")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--_rss-child", dest="rss_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        return _rss_child(args.rss_child)
    sizes, repeats = ([48], 2) if args.quick else (args.sizes, args.repeats)
    rows, summary = [], {}
    for size in sizes:
        print(f"\n2-D {size}x{size}, kernel {args.kernel}, dilation {args.dilation}, B=1, heads {args.heads}, "
              f"head_dim {args.head_dim}, fp32")
        part = compare((size, size), args.kernel, args.dilation, args.heads, args.head_dim, repeats,
                       rss=not args.no_rss, backward=not args.no_backward)
        rows += part
        by = {r["impl"]: r for r in part}
        ratios = {}
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_peak_MiB", "fwd_bwd_peak_MiB", "fwd_rss_MiB"):
            dense, xla = by["dense"].get(key), by["xla"].get(key)
            if dense and xla:
                ratios[key] = dense / xla
        summary[f"{size}x{size}"] = ratios
        print(f"dense / xla at {size}x{size}:", ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    extra = []
    if not args.no_scaling:
        cases = ([((256,), 7, 1, False), ((8, 8, 8), 3, 1, False)] if args.quick else
                 [((8192,), 7, 1, False), ((8192,), 31, 4, False), ((56, 56), 7, 1, True), ((56, 56), 7, 8, True),
                  ((128, 128), 7, 2, False), ((16, 32, 32), 5, 1, False)])
        print("\nxla path on other shapes (B=1):")
        extra = scaling(cases, args.heads, args.head_dim, repeats)
    write_json("neighborhood", {"config": vars(args), "load_average": os.getloadavg(), "comparison": rows,
                                "dense_over_xla": summary, "scaling": extra})


if __name__ == "__main__":
    main()
