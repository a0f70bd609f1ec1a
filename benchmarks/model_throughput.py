"""Throughput of one registered vision model: forward (eval) and train-step images/s, fp32.

    python benchmarks/model_throughput.py                          # dinat_mini, batch 8, 224 px
    python benchmarks/model_throughput.py --model biformer_tiny
    python benchmarks/model_throughput.py --quick                  # the family's pico, batch 2, 64 px (smoke run)
    python benchmarks/model_throughput.py --model dinat_tiny --implementation reference

Train step = forward in training mode (stochastic depth on) + cross-entropy + backward + AdamW update, all in one
jitted call, as a timm training step does. Times are the median of `--repeats` calls after a warm-up. The 2-core
machine is shared, so the load average is recorded beside the numbers, and so is the process CPU time per call
(`*_cpu_ms`, all threads): `2 * batch / cpu_seconds` bounds what two idle cores would give. Results: table and
results/throughput_<model>.json.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import print_table, write_json
from jaxattn import models


def _median_seconds(call, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (all threads) of one call."""
    jax.block_until_ready(call())  # compile + warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(call())
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def measure(name: str, batch: int, img_size: int, implementation: str | None, repeats: int) -> dict:
    model = models.create_model(name, img_size=img_size, implementation=implementation, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (batch, img_size, img_size, 3), jnp.float32)
    labels = jnp.arange(batch) % 1000

    forward = nnx.jit(lambda m, x: m(x))
    model.eval()
    start = time.perf_counter()
    jax.block_until_ready(forward(model, x))
    forward_compile = time.perf_counter() - start
    forward_s, forward_cpu = _median_seconds(lambda: forward(model, x), repeats)

    model.train()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.05), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    start = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, x, labels))
    train_compile = time.perf_counter() - start
    train_s, train_cpu = _median_seconds(lambda: train_step(model, optimizer, x, labels), repeats)
    return {"model": name, "batch": batch, "img_size": img_size, "implementation": implementation or "default",
            "forward_img_s": batch / forward_s, "train_img_s": batch / train_s, "forward_ms": 1e3 * forward_s,
            "train_ms": 1e3 * train_s, "forward_cpu_ms": 1e3 * forward_cpu, "train_cpu_ms": 1e3 * train_cpu,
            "compile_fwd_s": forward_compile, "compile_train_s": train_compile}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the family's pico, batch 2, 64 px, 2 repeats")
    parser.add_argument("--model", default="dinat_mini")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--implementation", default=None, help="the attention op's backend (default: auto)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.model = args.model.split("_")[0] + "_pico"
        args.batch, args.img_size, args.repeats = 2, 64, 2

    load_before = os.getloadavg()[0]
    row = measure(args.model, args.batch, args.img_size, args.implementation, args.repeats)
    row["load_avg_1min"] = round((load_before + os.getloadavg()[0]) / 2, 1)
    print_table([row], ["model", "batch", "img_size", "implementation", "forward_img_s", "train_img_s",
                        "forward_ms", "train_ms", "forward_cpu_ms", "train_cpu_ms", "compile_fwd_s", "compile_train_s", "load_avg_1min"])
    write_json(f"throughput_{args.model}" + ("_quick" if args.quick else ""), {"rows": [row], "args": vars(args)})


if __name__ == "__main__":
    main()
