"""What this CPU can do: GEMM and 3x3-convolution throughput of XLA:CPU and of PyTorch, fp32 (and bf16 GEMM).

    python benchmarks/cpu_peak.py            # GEMM 4096^3; convs at the shapes that dominate the vision models
    python benchmarks/cpu_peak.py --quick    # smaller shapes, 2 repeats (smoke run)

The ceiling for `benchmarks/models.py`: a model's train step cannot run faster than its FLOPs (XLA's cost analysis,
printed there as `gflop_step`) divided by the rate of the kernels it is made of. The convolutions are measured in
the three forms a train step runs: forward, input gradient and weight gradient (the last is where XLA:CPU is
weakest: it lowers it as a convolution whose window is the whole image). Rows give GFLOP/s (2 * multiply-adds per
second, median of the repeats) for XLA and, where torch is installed, for PyTorch on the same shapes and threads.
Output: a table and results/cpu_peak[_quick].json.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from benchmarks.common import median_seconds, print_table, write_json

# (name, batch, size, in channels, out channels): the stem and stage-1 3x3 convs of halonet26t and maxvit_tiny.
CONVS = (("halonet26t stem 32->64 @128", 8, 128, 32, 64), ("halonet26t stage1 64->64 @64", 8, 64, 64, 64),
         ("maxvit_tiny stem 64->64 @112", 8, 112, 64, 64))
COLUMNS = ["kernel", "shape", "gflop", "xla_gflop_s", "torch_gflop_s"]


def _xla_conv_calls(batch, size, cin, cout):
    """Forward, input-gradient and weight-gradient calls of a 3x3 stride-1 'SAME' NHWC conv."""
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
    g = jax.random.normal(jax.random.key(2), (batch, size, size, cout))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(conv)
    dx = jax.jit(lambda w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {"forward": lambda: fwd(x, w).block_until_ready(), "input grad": lambda: dx(w, g).block_until_ready(),
            "weight grad": lambda: dw(x, g).block_until_ready()}


def _torch_conv_calls(torch, batch, size, cin, cout):
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    w = torch.randn(cout, cin, 3, 3, requires_grad=True)
    g = torch.randn(batch, cout, size, size)
    conv = torch.nn.functional.conv2d

    def fwd():
        with torch.no_grad():
            conv(x, w, padding=1)

    def grad(wrt):
        return lambda: torch.autograd.grad(conv(x, w, padding=1), (wrt,), g)

    return {"forward": fwd, "input grad": grad(x), "weight grad": grad(w)}


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    n = 1024 if args.quick else 4096
    torch = _torch()
    rows = []
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((n, n), dtype)
        dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        row = {"kernel": f"GEMM {dtype}", "shape": f"{n}^3", "gflop": 2 * n ** 3 / 1e9}
        row["xla_gflop_s"] = row["gflop"] / median_seconds(lambda: dot(a, a).block_until_ready(), repeats=repeats)
        if torch is not None:
            t = torch.ones(n, n, dtype=getattr(torch, dtype))
            row["torch_gflop_s"] = row["gflop"] / median_seconds(lambda: torch.mm(t, t), repeats=repeats)
        rows.append(row)
        print_table([row], COLUMNS)
    for name, batch, size, cin, cout in CONVS:
        if args.quick:
            batch, size = 1, size // 4
        gflop = 2 * batch * size * size * cin * cout * 9 / 1e9
        xla = _xla_conv_calls(batch, size, cin, cout)
        ref = _torch_conv_calls(torch, batch, size, cin, cout) if torch is not None else {}
        for form, call in xla.items():
            row = {"kernel": f"conv3x3 {form}", "shape": name, "gflop": gflop,
                   "xla_gflop_s": gflop / median_seconds(call, repeats=repeats)}
            if form in ref:
                row["torch_gflop_s"] = gflop / median_seconds(ref[form], repeats=repeats)
            rows.append(row)
            print_table([row], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    write_json("cpu_peak" + ("_quick" if args.quick else ""), {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
