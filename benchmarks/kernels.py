"""Attention kernels on an accelerator: TFLOP/s of forward and forward+backward.

    python benchmarks/kernels.py              # T = 1k .. 16k, causal and full, bf16, B=4, N=16, H=128
    python benchmarks/kernels.py --quick      # T = 1k, 2k, causal only
    python benchmarks/kernels.py --interpret  # CPU smoke test of this script (tiny shapes, interpreter; no timing value)

Compared, where the platform has them: `jax.nn.dot_product_attention` (cuDNN on GPU, its XLA path), jaxattn's
blocked XLA path, the Pallas kernel (Mosaic on TPU, Pallas-Triton on GPU) and the Triton kernel (jax-triton, GPU).
FLOPs count the two attention matmuls (4 B N T S H, halved when causal); the backward counts 2.5x the forward.

Lightning section (`lightning_attention`, causal with TransNormerLLM decay, same shapes; `--lightning-only` skips
softmax attention, `--no-lightning` skips this): the chunked XLA path against the Pallas and Triton scans. Its
cost is linear in T, so it reports time and million tokens per second (B T / time); forward + backward is
`value_and_grad` of the output and final state.

Neighborhood section (`benchmarks/kernels_neighborhood.py`; `--neighborhood-only` runs only it, `--no-neighborhood`
skips it): the blocked XLA path against the fused Pallas kernel, 2-D NAT/DiNAT shapes and 1-D T = 8192, rows under
"neighborhood"; and, counted from the kernel plans on any machine, the logits each plan (TPU v4/v5e/v5p/v6e, GPU)
computes against those the windows need, rows under "neighborhood_waste".

cuDNN section (`benchmarks/kernels_cudnn.py`; `--cudnn-only` runs only it, `--no-cudnn` skips it): on a GPU each
GPU kernel (Pallas-Triton, Triton) against `jax.nn.dot_product_attention(implementation='cudnn')`, causal and
full, MHA and GQA, d = 64 and 128, as TFLOP/s and their ratio to cuDNN's; rows under "cudnn". Without a GPU the
rows list the cases and say the column needs a GPU.

TPU compile section (`benchmarks/kernels_tpu_compile.py`, `--tpu-compile`; any machine with libtpu): the flash
and lightning kernels compiled for v4, v5e, v5p and v6e with the blocks each generation's plan chooses; rows
under "tpu_compile".

Without a GPU or TPU the script prints the counted tables, says so and exits 0. Results: printed tables,
results/kernels.json (attention rows under "rows", lightning rows under "lightning"), results/kernels.png (TFLOP/s
against T) and results/kernels_lightning.png (Mtok/s against T).
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
from benchmarks import kernels_cudnn, kernels_neighborhood, kernels_tpu_compile
from benchmarks.common import RESULTS, print_table, time_fn, write_json


def _candidates(platform: str, interpret: bool) -> dict:
    """name -> f(q, k, v, causal) on heads-last arrays."""
    def ours(impl):
        return lambda q, k, v, causal: jaxattn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    def jax_nn(impl):
        return lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    if interpret:
        return {"jaxattn-xla": ours("xla"), "pallas(interpret)": ours("pallas")}
    out = {"jax.nn-xla": jax_nn("xla"), "jaxattn-xla": ours("xla"), "pallas": ours("pallas")}
    if platform == "gpu":
        out = {"jax.nn-cudnn": jax_nn("cudnn"), **out, "triton": ours("triton")}
    return out


def _lightning_candidates(platform: str, interpret: bool) -> dict:
    """name -> f(q, k, v, slopes) -> (out, final_state), causal lightning attention."""
    def ours(impl):
        return lambda q, k, v, slopes: jaxattn.lightning_attention(q, k, v, slopes=slopes, return_state=True,
                                                                   implementation=impl)

    if interpret:
        return {"lightning-xla": ours("xla"), "lightning-pallas(interpret)": ours("pallas")}
    out = {"lightning-xla": ours("xla"), "lightning-pallas": ours("pallas")}
    if platform == "gpu":
        out["lightning-triton"] = ours("triton")
    return out


def _lightning_rows(args, lengths) -> list[dict]:
    platform = jax.default_backend()
    dtype = jnp.float32 if args.interpret else jnp.bfloat16
    slopes = jaxattn.lightning_slopes(args.heads)
    rows = []
    for t in lengths:
        keys = jax.random.split(jax.random.key(t + 1), 3)
        q, k, v = (jax.random.normal(key, (args.batch, t, args.heads, args.head_dim), dtype) for key in keys)
        for name, fn in _lightning_candidates(platform, args.interpret).items():
            fwd = functools.partial(fn, slopes=slopes)

            def fwd_bwd(q, k, v, fwd=fwd):
                def loss(q, k, v):
                    out, state = fwd(q, k, v)
                    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)
                return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

            row = {"T": t, "impl": name}
            try:
                fwd_s = time_fn(fwd, q, k, v, repeats=args.repeats)
                fwd_bwd_s = time_fn(fwd_bwd, q, k, v, repeats=args.repeats)
            except Exception as err:  # an implementation missing on this machine is a row
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            else:
                tokens = args.batch * t
                row.update(fwd_ms=1e3 * fwd_s, fwd_Mtok_s=tokens / fwd_s / 1e6, fwd_bwd_ms=1e3 * fwd_bwd_s,
                           fwd_bwd_Mtok_s=tokens / fwd_bwd_s / 1e6)
            rows.append(row)
            print_table([row], list(row))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interpret", action="store_true", help="tiny CPU smoke run of the script itself")
    parser.add_argument("--lightning-only", action="store_true", help="only the lightning-attention section")
    parser.add_argument("--no-lightning", action="store_true", help="skip the lightning-attention section")
    parser.add_argument("--neighborhood-only", action="store_true", help="only the neighborhood-attention section")
    parser.add_argument("--no-neighborhood", action="store_true", help="skip the neighborhood-attention section")
    parser.add_argument("--cudnn-only", action="store_true", help="only the GPU kernels against cuDNN")
    parser.add_argument("--no-cudnn", action="store_true", help="skip the GPU kernels against cuDNN")
    parser.add_argument("--tpu-compile", action="store_true", help="also compile the kernels for each TPU generation")
    args = parser.parse_args(argv)
    platform = jax.default_backend()
    only = args.lightning_only or args.neighborhood_only or args.cudnn_only
    waste = [] if args.no_neighborhood or (only and not args.neighborhood_only) else kernels_neighborhood.waste_rows()
    if waste:
        print("neighborhood attention: logits computed / needed per kernel plan (counted, no hardware needed)")
        print_table(waste, kernels_neighborhood.WASTE_COLUMNS)
    tpu_compile = kernels_tpu_compile.rows() if args.tpu_compile else []
    if tpu_compile:
        print("\nflash + lightning kernels compiled per TPU generation (libtpu, deviceless; T = 8192, d = 128)")
        print_table(tpu_compile, kernels_tpu_compile.COLUMNS)
    lengths = [1024, 2048] if args.quick else args.lengths
    cudnn = [] if args.no_cudnn or (only and not args.cudnn_only) or args.interpret else kernels_cudnn.rows(
        [4096, 8192] if lengths == parser.get_default("lengths") else lengths, batch=args.batch,
        repeats=args.repeats, quick=args.quick)
    if cudnn:
        print("\nGPU kernels against cuDNN (jax.nn.dot_product_attention(implementation='cudnn'))")
        print_table(cudnn, kernels_cudnn.COLUMNS)
    counted = {"neighborhood_waste": waste, "cudnn": cudnn, "tpu_compile": tpu_compile}
    if platform == "cpu" and not args.interpret:
        print(f"No GPU or TPU here (jax backend: {platform}, devices: {jax.devices()}): the kernels only run in the "
              "Pallas interpreter on CPU, which measures nothing useful, and the cuDNN comparison needs a GPU. "
              "Run this on a GPU or TPU machine (or pass --interpret for a smoke test of the script).")
        write_json("kernels", {"config": vars(args), "platform": platform, **counted})
        return 0
    modes = [True] if args.quick else [True, False]
    if args.interpret:
        lengths, modes, args.batch, args.heads, args.kv_heads, args.head_dim, args.repeats = [64], [True], 1, 2, 2, 32, 1
    dtype = jnp.float32 if args.interpret else jnp.bfloat16
    rows = []
    for t in ([] if only else lengths):
        keys = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(keys[0], (args.batch, t, args.heads, args.head_dim), dtype)
        k = jax.random.normal(keys[1], (args.batch, t, args.kv_heads, args.head_dim), dtype)
        v = jax.random.normal(keys[2], (args.batch, t, args.kv_heads, args.head_dim), dtype)
        for causal in modes:
            flops = kernels_cudnn.flops(args.batch, args.heads, t, args.head_dim, causal)
            for name, fn in _candidates(platform, args.interpret).items():
                row = {"T": t, "causal": causal, "impl": name}
                try:
                    fwd_s, fwd_bwd_s = kernels_cudnn.time_fwd_and_bwd(fn, q, k, v, causal, args.repeats)
                except Exception as err:  # an implementation missing on this machine (e.g. no cuDNN) is a row
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                else:
                    row.update(fwd_ms=1e3 * fwd_s, fwd_TFLOPs=flops / fwd_s / 1e12,
                               fwd_bwd_ms=1e3 * fwd_bwd_s,
                               fwd_bwd_TFLOPs=(1 + kernels_cudnn.BACKWARD_FACTOR) * flops / fwd_bwd_s / 1e12)
                rows.append(row)
                print_table([row], list(row))
    lightning = [] if args.no_lightning or (only and not args.lightning_only) else _lightning_rows(args, lengths)
    neighborhood = [] if args.no_neighborhood or (only and not args.neighborhood_only) else kernels_neighborhood.rows(
        quick=args.quick, interpret=args.interpret, repeats=args.repeats)
    if rows:
        print()
        print_table(rows, ["T", "causal", "impl", "fwd_ms", "fwd_TFLOPs", "fwd_bwd_ms", "fwd_bwd_TFLOPs", "error"])
        _plot(rows, ("fwd_TFLOPs", "fwd_bwd_TFLOPs"), "kernels.png")
    if lightning:
        print()
        print_table(lightning, ["T", "impl", "fwd_ms", "fwd_Mtok_s", "fwd_bwd_ms", "fwd_bwd_Mtok_s", "error"])
        _plot([dict(r, causal=True) for r in lightning], ("fwd_Mtok_s", "fwd_bwd_Mtok_s"), "kernels_lightning.png")
    if neighborhood:
        print()
        print_table(neighborhood, kernels_neighborhood.COLUMNS)
    write_json("kernels", {"config": vars(args), "platform": platform, "rows": rows, "lightning": lightning,
                           "neighborhood": neighborhood, **counted})
    return 0


def _plot(rows, keys, filename):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, keys):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            for causal in (True, False):
                pts = [(r["T"], r[key]) for r in rows if r["impl"] == impl and r["causal"] == causal and key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{impl}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / filename
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
