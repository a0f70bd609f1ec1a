"""HaloNet throughput on this machine: forward (eval) and train-step images/s, fp32, against timm's figures.

    python benchmarks/halonet.py                       # halonet26t and halonet_h1, batch 8, 256 px
    python benchmarks/halonet.py --quick               # halonet_pico, batch 2, 64 px (smoke run)
    python benchmarks/halonet.py --models halonet50ts --implementation reference

A train step is forward in training mode + cross-entropy + backward + SGD-momentum update in one jitted call.
Times are medians over `--repeats` calls after compilation. The machine's 2 cores are shared, so the 1-minute
load average is recorded, and so is the process CPU time per call (all threads): `2 * batch / cpu_seconds` is
what two idle cores would give (`*_img_s_2core`). timm's numbers (platform.md) were taken on the same 2 cores.
Output: a table and results/halonet[_quick].json.
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

TIMM = {"halonet26t": (12.0, 3.5), "halonet_h1": (3.2, 1.5)}  # platform.md: forward, train img/s @256, batch 8


def _timed(call, repeats: int) -> tuple[float, float, float]:
    """(first-call seconds incl. compile, median wall seconds, median process CPU seconds) of `call()`."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(call())
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return first, sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def measure(name: str, batch: int, img_size: int, implementation: str | None, repeats: int) -> dict:
    model = models.create_model(name, img_size=img_size, attn_implementation=implementation, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (batch, img_size, img_size, 3), jnp.float32)
    labels = jnp.arange(batch) % 1000

    model.eval()
    forward = nnx.jit(lambda model, x: model(x))
    fwd_first, fwd_wall, fwd_cpu = _timed(lambda: forward(model, images), repeats)

    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    train_first, train_wall, train_cpu = _timed(lambda: train_step(model, optimizer, images, labels), repeats)
    timm_fwd, timm_train = TIMM.get(name, (None, None))
    row = {"model": name, "batch": batch, "img_size": img_size, "implementation": implementation or "default",
           "forward_img_s": batch / fwd_wall, "train_img_s": batch / train_wall,
           "forward_img_s_2core": 2 * batch / fwd_cpu, "train_img_s_2core": 2 * batch / train_cpu,
           "timm_forward_img_s": timm_fwd, "timm_train_img_s": timm_train,
           "compile_fwd_s": fwd_first - fwd_wall, "compile_train_s": train_first - train_wall}
    return {k: v for k, v in row.items() if v is not None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="halonet_pico, batch 2, 64 px, 2 repeats")
    parser.add_argument("--models", nargs="+", default=["halonet26t", "halonet_h1"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--implementation", default=None, help="halo_attention backend (default: auto)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.img_size, args.repeats = ["halonet_pico"], 2, 64, 2

    rows = []
    for name in args.models:
        load = os.getloadavg()[0]
        row = measure(name, args.batch, args.img_size, args.implementation, args.repeats)
        row["load_avg_1min"] = round((load + os.getloadavg()[0]) / 2, 1)
        rows.append(row)
    print_table(rows, ["model", "batch", "img_size", "implementation", "forward_img_s", "train_img_s",
                       "forward_img_s_2core", "train_img_s_2core", "timm_forward_img_s", "timm_train_img_s",
                       "compile_fwd_s", "compile_train_s", "load_avg_1min"])
    write_json("halonet" + ("_quick" if args.quick else ""), {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
