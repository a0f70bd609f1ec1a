"""Model-zoo throughput: forward (eval) and train-step images/s per family, with timm side by side.

    python benchmarks/models.py                          # the representatives, batch 8, fp32, timm where installed
    python benchmarks/models.py --dtype bfloat16         # ours with dtype=bfloat16, timm under torch.autocast
    python benchmarks/models.py --quick                  # pico variants, batch 2, no timm (smoke run)
    python benchmarks/models.py --models maxvit_tiny --repeats 5
    python benchmarks/models.py --models dinat_tiny --override implementation=reference
    python benchmarks/models.py --threads 1              # one thread per side: CPU time on a loaded machine
    python benchmarks/models.py --isolate                # timm in its own process (idle machine)
    python benchmarks/models.py --no-timm                # ours only; timm columns show platform.md's figures

Representatives: maxvit_tiny @224 (timm `maxvit_tiny_tf_224`), halonet26t @256, halonet_h1 @256 (timm's own
names), dinat_tiny @224, biformer_tiny @224 (ours only). A train step is forward in training mode (dropout,
stochastic depth, BatchNorm statistics) + cross-entropy + backward + AdamW update: for us one jitted call with the
state donated, for timm `zero_grad / forward / backward / step`. Our models are built abstractly and filled with
random numbers (throughput does not depend on the values); timm's are built with `pretrained=False`.

The cores are shared with other work, so ours and timm's calls are interleaved repeat by repeat, and every call
records wall time and the process CPU time (all threads). Two frameworks in one process disturb each other
(thread pools spinning after their work, one heap); on an idle machine `--isolate` is the cleaner comparison:
timm then runs after ours, alone in a child process of this script. `*_img_s` is `batch / median wall seconds`;
`*_cpu_img_s` is `cores * batch / median CPU seconds`, what the idle machine would give if the work kept every core
busy, and the fairer comparison under load. `x_timm` / `x_timm_cpu` are our train-step speed over timm's by either.
`gflop_step` is the train step's FLOPs (XLA's cost analysis) and `*train_gflop_s` the rate each side sustains:
compare it with what the CPU's kernels reach (`python benchmarks/cpu_peak.py`) to see how far a step can go.
XLA counts a loop's body once, so steps with loops undercount (halonet_h1: its CPU halo attention maps over
chunks of tiles; 104 GFLOP counted of ~144).
Both sides run with glibc malloc told to keep freed memory (`jaxattn.models.layers.malloc`, which removes
per-step page faults; `--no-malloc-tuning` to compare), and `--threads 1` gives each side one thread, which
keeps CPU time honest on an oversubscribed machine (multi-threaded runtimes spin while waiting for descheduled
threads). timm is imported through `benchmarks/timm_import.py` (a placeholder torchvision where the real one cannot load);
without timm, the timm columns show the figures recorded in `../shared/reference/platform.md` (marked
`recorded`). `--dtype bfloat16` builds ours with `dtype=bfloat16` (bf16 compute, fp32 parameters and optimizer
state) and runs timm's forward and train step under `torch.autocast('cpu', torch.bfloat16)` (its recipe for the
same thing); a family whose constructor takes no `dtype=` yet is skipped, named. Output: a table and
results/models[_quick][_bfloat16].json.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import print_table, write_json
from jaxattn import models
from jaxattn.models.layers.malloc import keep_freed_memory
from jaxattn.models.layers.tracing import eval_shape_model, fast_tracing
from jaxattn.testing.model_init import materialize

# ours: (image size, timm name or None, timm forward img/s, timm train img/s as recorded in platform.md)
REPRESENTATIVES = {
    "maxvit_tiny": (224, "maxvit_tiny_tf_224", 7.5, 2.4),
    "halonet26t": (256, "halonet26t", 12.0, 3.5),
    "halonet_h1": (256, "halonet_h1", 3.2, 1.5),
    "dinat_tiny": (224, None, None, None),
    "biformer_tiny": (224, None, None, None),
}
QUICK = ("maxvit_pico", "halonet_pico", "dinat_pico", "biformer_pico")
NUM_CLASSES = 1000
COLUMNS = ["model", "dtype", "img", "batch", "fwd_img_s", "fwd_cpu_img_s", "train_img_s", "train_cpu_img_s",
           "timm_fwd_img_s", "timm_fwd_cpu_img_s", "timm_train_img_s", "timm_train_cpu_img_s", "x_timm",
           "x_timm_cpu", "gflop_step", "train_gflop_s", "timm_train_gflop_s", "timm", "compile_train_s", "load"]


class Timer:
    """Wall and process-CPU seconds of each `run(call)`; `median()` gives both medians."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def run(self, call):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - start_cpu)

    def median(self):
        mid = len(self.wall) // 2
        return sorted(self.wall)[mid], sorted(self.cpu)[mid]


def build_ours(name: str, img_size: int | None, overrides: dict):
    kwargs = dict(overrides) if img_size is None else {"img_size": img_size, **overrides}
    with fast_tracing():
        model = eval_shape_model(lambda: models.create_model(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0),
                                                             **kwargs))
    return materialize(model, fill="random", seed=0)


class OursCalls(NamedTuple):
    """Our side of a row: blocking forward and train-step calls, and facts about the compiled step."""
    forward: Callable[[], None]
    train: Callable[[], None]
    compile_train_s: float
    flops: float  # XLA's cost analysis of the train step (2 per multiply-add; the same architecture as timm's)
    compiled_train: Any  # jax.stages.Compiled, for HLO text (benchmarks/profile_step.py)


def ours_calls(model, images, labels) -> OursCalls:
    """Compiles our forward (eval mode) and train step (training mode, AdamW, state donated)."""
    model.eval()
    graph, state = nnx.split(model)
    with fast_tracing():
        forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x)).lower(state, images).compile()

    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3, weight_decay=0.05)

    def train_step(carry, x, y):
        params, opt_state, rest = carry
        module = nnx.merge(graph, params, rest)
        loss, grads = nnx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(module)
        updates, opt_state = tx.update(grads, opt_state, params)
        _, _, rest = nnx.split(module, nnx.Param, ...)  # BatchNorm statistics and rng counters moved on
        return optax.apply_updates(params, updates), opt_state, rest

    carry = [(params, tx.init(params), rest)]
    start = time.perf_counter()
    with fast_tracing():
        step = jax.jit(train_step, donate_argnums=0).lower(carry[0], images, labels).compile()
    compile_train = time.perf_counter() - start

    def train():
        carry[0] = step(carry[0], images, labels)
        jax.block_until_ready(carry[0])

    flops = float((step.cost_analysis() or {}).get("flops", 0.0))
    return OursCalls(lambda: jax.block_until_ready(forward(state, images)), train, compile_train, flops, step)


def timm_calls(timm, timm_name: str, batch: int, img_size: int, dtype: str = "float32") -> tuple:
    """timm's (forward call, train-step call) on the same batch shape, NCHW; for bfloat16 both under
    `torch.autocast('cpu', torch.bfloat16)` (fp32 parameters and optimizer, bf16 matmuls and convolutions)."""
    import contextlib

    import torch
    model = timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES, img_size=img_size)
    images = torch.randn(batch, 3, img_size, img_size)
    labels = torch.arange(batch) % NUM_CLASSES
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    def precision():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=getattr(torch, dtype))

    def forward():
        model.eval()
        with torch.no_grad(), precision():
            model(images)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with precision():
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()

    return forward, train


def time_sides(sides: dict, repeats: int) -> dict:
    """`{side: (forward call, train call)}` -> `{(side, kind): (median wall s, median CPU s)}`."""
    timers = {(side, kind): Timer() for side in sides for kind in ("fwd", "train")}
    for kind, index in (("fwd", 0), ("train", 1)):
        for calls in sides.values():
            calls[index]()  # warm-up (timm: allocator, thread pool; ours: first-call buffers)
        for _ in range(repeats):  # interleaved, so that both sides see the same load
            for side, calls in sides.items():
                timers[side, kind].run(calls[index])
    return {key: timer.median() for key, timer in timers.items()}


def timm_in_child(timm_name: str, batch: int, img_size: int, repeats: int, args) -> dict:
    """timm's medians measured by a child process of this script (`--timm-child`), with the same settings."""
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--timm-child", timm_name, "--batch",
               str(batch), "--img", str(img_size), "--repeats", str(repeats)]
    command += ["--threads", str(args.threads)] if args.threads is not None else []
    command += ["--dtype", args.dtype]
    command += ["--no-malloc-tuning"] if args.no_malloc_tuning else []
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the timm child process failed:\n{result.stderr[-2000:]}")
    medians = json.loads(result.stdout.strip().splitlines()[-1])
    return {("timm", kind): tuple(value) for kind, value in medians.items()}


def measure(name: str, img_size: int | None, batch: int, repeats: int, overrides: dict, timm=None,
            timm_name: str | None = None, isolate_args=None, dtype: str = "float32") -> dict:
    """One table row. With `isolate_args` (the parsed command line), timm runs after ours in its own process."""
    precision = {} if dtype == "float32" else {"dtype": jnp.dtype(dtype)}
    model = build_ours(name, img_size, {**precision, **overrides})
    if img_size is None:
        size = getattr(model, "img_size", 64)
        img_size = size[0] if isinstance(size, (tuple, list)) else int(size)
    images = jax.random.normal(jax.random.key(0), (batch, img_size, img_size, 3), jnp.float32)
    labels = jnp.arange(batch) % NUM_CLASSES
    fwd, train, compile_train, flops, _ = ours_calls(model, images, labels)
    sides = {"ours": (fwd, train)}
    if timm is not None and timm_name and isolate_args is None:
        sides["timm"] = timm_calls(timm, timm_name, batch, img_size, dtype)
    medians = time_sides(sides, repeats)
    if timm is not None and timm_name and isolate_args is not None:
        del model, fwd, train, sides  # free our buffers before the child runs
        medians.update(timm_in_child(timm_name, batch, img_size, repeats, isolate_args))
    cores = os.cpu_count() or 1
    row = {"model": name, "dtype": dtype, "img": img_size, "batch": batch, "compile_train_s": compile_train,
           "gflop_step": flops / 1e9}
    for (side, kind), (wall, cpu) in medians.items():
        prefix = "" if side == "ours" else "timm_"
        row[f"{prefix}{kind}_img_s"] = batch / wall
        row[f"{prefix}{kind}_cpu_img_s"] = cores * batch / cpu
        row[f"{prefix}{kind}_ms"], row[f"{prefix}{kind}_cpu_ms"] = 1e3 * wall, 1e3 * cpu
        if kind == "train" and flops:
            row[f"{prefix}train_gflop_s"] = flops / 1e9 / wall
    return row


def _timm_child(args, timm) -> None:
    """`--timm-child NAME`: time timm alone and print `{kind: [wall, cpu]}` as the last line."""
    medians = time_sides({"timm": timm_calls(timm, args.timm_child, args.batch, args.img, args.dtype)},
                         args.repeats)
    print(json.dumps({kind: list(value) for (_, kind), value in medians.items()}))


def set_threads(n: int) -> None:
    """Intra-op threads for torch, and for XLA:CPU when `n == 1` (before JAX's backend starts)."""
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false"
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def _parse_overrides(items) -> dict:
    out = {}
    for item in items or ():
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pico variants, batch 2, 2 repeats, no timm")
    parser.add_argument("--models", nargs="*", help="registered names (default: the representatives)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timm", action="store_true", help="do not measure timm even where installed")
    parser.add_argument("--override", nargs="*", metavar="KEY=VALUE", help="constructor overrides for our models")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc as it is (default: `keep_freed_memory()`, for both sides)")
    parser.add_argument("--threads", type=int, default=None,
                        help="1: XLA and torch on one thread each (fair CPU time on a loaded machine)")
    parser.add_argument("--isolate", action="store_true",
                        help="timm in its own process, after ours (default: both interleaved in this process)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype: ours `dtype=`, timm under torch.autocast (parameters stay fp32)")
    parser.add_argument("--timm-child", help=argparse.SUPPRESS)
    parser.add_argument("--img", type=int, default=224, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        set_threads(args.threads)
    malloc_tuned = False if args.no_malloc_tuning else keep_freed_memory()
    print(f"malloc tuning (models/layers/malloc.py): {'on' if malloc_tuned else 'off'}")
    names = list(QUICK) if args.quick else list(REPRESENTATIVES)
    names = args.models or names
    if args.quick:
        args.batch, args.repeats, args.no_timm = 2, 2, True
    overrides = _parse_overrides(args.override)

    timm, timm_note = (None, "not measured (--no-timm or --quick)")
    if not args.no_timm:
        from benchmarks.timm_import import import_timm
        timm, timm_note = import_timm()
    if args.timm_child:
        return _timm_child(args, timm)
    print(f"timm: {timm_note}")

    registered = set(models.list_models(kind="vision"))
    rows = []
    for name in names:
        if name not in registered:
            print(f"skipping {name}: not registered")
            continue
        img_size, timm_name, rec_fwd, rec_train = REPRESENTATIVES.get(name, (None, None, None, None))
        load_before = os.getloadavg()[0]
        try:
            row = measure(name, img_size, args.batch, args.repeats, overrides, timm, timm_name,
                          isolate_args=args if args.isolate else None, dtype=args.dtype)
        except TypeError as e:
            if "unexpected keyword argument 'dtype'" not in str(e):
                raise
            print(f"skipping {name}: its family takes no dtype= yet ({e})")
            continue
        row["load"] = round((load_before + os.getloadavg()[0]) / 2, 1)
        if "timm_train_img_s" in row:
            row["timm"] = "measured"
            row["x_timm"] = row["train_img_s"] / row["timm_train_img_s"]
            row["x_timm_cpu"] = row["train_cpu_img_s"] / row["timm_train_cpu_img_s"]
        elif rec_train is not None and args.batch == 8 and args.dtype == "float32":
            row.update(timm="recorded", timm_fwd_img_s=rec_fwd, timm_train_img_s=rec_train,
                       x_timm=row["train_img_s"] / rec_train)
        rows.append(row)
        print_table([row], COLUMNS)
    print(f"\n*_img_s: batch / wall s; *_cpu_img_s: {os.cpu_count()} * batch / CPU s; x_timm: our train step "
          f"over timm's; load: 1-min load average")
    print_table(rows, COLUMNS)
    write_json("models" + ("_quick" if args.quick else "") + ("" if args.dtype == "float32" else f"_{args.dtype}"),
               {"rows": rows, "args": vars(args), "timm": timm_note, "malloc_tuned": malloc_tuned})


if __name__ == "__main__":
    main()
