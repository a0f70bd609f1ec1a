"""The published configurations compiled for TPU slices (`python -m train.aot`, deviceless libtpu): per-device memory,
fit, FLOPs, roofline step time and compile time. Each row runs in its own process (a compile can take many minutes
and GiBs of host memory); results go to `results/pods/<row>.json` (the tool's report, plus the row's command and
wall time) and `results/pods.json`, with a PNG of memory per device against each chip's HBM.

    python benchmarks/pods.py                       # every row (hours on 2 cores)
    python benchmarks/pods.py --rows tn7b_8k maxvit_l512_v6e --jobs 2
    python benchmarks/pods.py --reuse               # only rows without a result yet; then the table of all
    python benchmarks/pods.py --quick               # one tiny config on v5e:2x2 (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "pods")

LM_8K = ["--config.seq_len=8192", "--config.batch_size=256", "--config.eval_batch_size=256",
         "--config.dtype=bfloat16", "--config.remat=full"]
# The other remat policies of the 8k rows (the MFU bound each allows; 'full' is the rows above).
REMAT = {"dots": "dots_saveable", "dots_nobatch": "dots_with_no_batch_dims_saveable", "none": "none"}
LM_32K = ["--config.seq_len=32768", "--config.batch_size=64", "--config.eval_batch_size=64",
          "--config.dtype=bfloat16", "--config.remat=full", "--config.mesh.fsdp=16", "--config.mesh.context=4"]
LM_128K = ["--config.seq_len=131072", "--config.batch_size=32", "--config.eval_batch_size=32",
           "--config.dtype=bfloat16", "--config.remat=full", "--config.mesh.fsdp=32", "--config.mesh.context=4"]
VISION = ["--config.batch_size=1024", "--config.eval_batch_size=1024"]  # eval 1000 does not split over 64 chips


def _image(px):
    return [f"--config.image_size={px}", f"--config.model_kwargs.img_size={px}"]


# name: (config, topology, overrides), in the order they run
ROWS = {
    "tn7b_8k": ("transnormer.py:7b_lm1b", "v5p:4x4x4", LM_8K),
    "maxvit_l512_v6e": ("maxvit.py:large_imagenet", "v6e:8x8", VISION + _image(512)),
    "dinat_l384_v6e": ("dinat.py:large_imagenet", "v6e:8x8", VISION + _image(384)),
    "maxvit_l512_v5e": ("maxvit.py:large_imagenet", "v5e:8x8", VISION + _image(512)),
    "dinat_l384_v5e": ("dinat.py:large_imagenet", "v5e:8x8", VISION + _image(384)),
    "sm7b_8k": ("softmax_lm.py:7b_lm1b", "v5p:4x4x4", LM_8K),
    "tn7b_32k_lasp2": ("transnormer.py:7b_lm1b", "v5p:4x4x4", LM_32K + ["--config.context_parallel=lasp2"]),
    "sm7b_32k_ring": ("softmax_lm.py:7b_lm1b", "v5p:4x4x4", LM_32K + ["--config.context_parallel=ring"]),
    "sm1b_32k_ring_v5e": ("softmax_lm.py:1b_lm1b", "v5e:4x4",
                          ["--config.seq_len=32768", "--config.batch_size=16", "--config.eval_batch_size=16",
                           "--config.dtype=bfloat16", "--config.remat=full", "--config.mesh.fsdp=4",
                           "--config.mesh.context=4", "--config.context_parallel=ring"]),
    "tn7b_128k_lasp2": ("transnormer.py:7b_lm1b", "v5p:4x4x8", LM_128K + ["--config.context_parallel=lasp2"]),
    "sm7b_128k_ring": ("softmax_lm.py:7b_lm1b", "v5p:4x4x8", LM_128K + ["--config.context_parallel=ring"]),
}
ROWS.update({f"{lm}7b_8k_remat_{short}": (config, "v5p:4x4x4", LM_8K[:-1] + [f"--config.remat={policy}"])
             for lm, config in (("tn", "transnormer.py:7b_lm1b"), ("sm", "softmax_lm.py:7b_lm1b"))
             for short, policy in REMAT.items()})
QUICK = {"tiny_lm_v5e": (os.path.join("..", "tests", "train", "tiny_config.py:lm"), "v5e:2x2",
                         ["--config.compile_fast=false"])}


def command(config: str, topology: str, overrides: list[str], json_path: str) -> list[str]:
    return [sys.executable, "-m", "train.aot", f"--config={os.path.join('configs', config)}",
            f"--topology={topology}", *overrides, f"--json={json_path}", "--noeval_step",
            f"--hlo={json_path.removesuffix('.json.tmp')}.hlo.txt"]


def run_row(name: str, row, timeout: float) -> dict:
    config, topology, overrides = row
    json_path = os.path.join(OUT, f"{name}.json")
    cmd = command(config, topology, overrides, json_path + ".tmp")
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests", "train"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with open(os.path.join(OUT, f"{name}.log"), "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    result = {"row": name, "config": config, "topology": topology, "overrides": overrides, "wall_seconds": wall,
              "command": " ".join(cmd[1:-3]), "status": rc}
    if rc == 0:
        with open(json_path + ".tmp") as f:
            result["report"] = json.load(f)
        os.remove(json_path + ".tmp")
    else:
        with open(os.path.join(OUT, f"{name}.log")) as f:
            errors = [line.strip() for line in f if line.startswith("error:")]
        result["error"] = errors[-1] if errors else f"exit {rc}"
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def table(results: list[dict]) -> str:
    head = ("row", "config", "slice, mesh", "HBM / device (GiB)", "fits", "FLOPs compiled / model", "step >= (s)",
            "MFU bound", "compile (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    from jaxattn.train import aot_chips  # noqa: PLC0415 - light; no JAX needed
    for r in results:
        rep = r.get("report")
        if rep is None:
            lines.append(f"| {r['row']} | `{r['config']}` | `{r['topology']}` | {r.get('error', r['status'])} |"
                         " | | | | " + f"{r['wall_seconds']:.0f} |")
            continue
        m = rep["memory_per_device"]
        peak = m["arguments"] + m["outputs"] + m["temporaries"] - m["aliased"]
        chip = aot_chips.chip_of(rep["topology"])
        mfu = rep["model_flops_per_step"] / (rep["step_time_lower_bound_s"] * chip.peak_bf16_flops_per_s
                                            * rep["num_devices"])
        mesh = " x ".join(f"{k} {v}" for k, v in rep["mesh"].items() if v > 1)
        lines.append(f"| {r['row']} | `{r['config']}` | `{rep['topology']}`, {mesh} | {peak / 2**30:.1f} of "
                     f"{rep['hbm_per_device'] / 2**30:.0f} | {'yes' if rep['fits'] else 'no'} | "
                     f"{rep['flops_per_step']:.2e} / {rep['model_flops_per_step']:.2e} | "
                     f"{rep['step_time_lower_bound_s']:.3g} | {100 * mfu:.1f}% | {rep['compile_seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in results if "report" in r]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(done)), 4))
    for i, r in enumerate(done):
        m = r["report"]["memory_per_device"]
        peak = (m["arguments"] + m["outputs"] + m["temporaries"] - m["aliased"]) / 2**30
        ax.bar(i, peak, color="tab:green" if r["report"]["fits"] else "tab:red")
        ax.hlines(r["report"]["hbm_per_device"] / 2**30, i - 0.4, i + 0.4, colors="k")
    ax.set_xticks(range(len(done)), [r["row"] for r in done], rotation=30, ha="right")
    ax.set_ylabel("GiB per device (line: the chip's HBM)")
    ax.set_yscale("log")
    ax.set_title("train step compiled for TPU slices (train.aot)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", help=f"rows to run (default all): {', '.join(ROWS)}")
    parser.add_argument("--reuse", action="store_true", help="skip rows that already have a result")
    parser.add_argument("--jobs", type=int, default=1, help="rows compiled at once")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    parser.add_argument("--quick", action="store_true", help="one tiny config on v5e:2x2")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rows = QUICK if args.quick else {k: ROWS[k] for k in (args.rows or ROWS)}
    todo = {k: v for k, v in rows.items() if not (args.reuse and os.path.exists(os.path.join(OUT, f"{k}.json")))}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for result in pool.map(lambda kv: run_row(*kv, args.timeout), todo.items()):
            print(f"{result['row']}: status {result['status']}, {result['wall_seconds']:.0f} s", flush=True)
    results = []
    for name in rows:
        path = os.path.join(OUT, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    stem = os.path.join(ROOT, "results", "pods_quick" if args.quick else "pods")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, stem + ".png")
    print(table(results))
    print(f"wrote {stem}.json, {stem}.png")


if __name__ == "__main__":
    main()
