"""Where a model's CPU train step spends its time: the slowest compiled ops, with shapes and kinds.

    python benchmarks/profile_step.py maxvit_tiny              # the benchmark's train step (batch 8, its image size)
    python benchmarks/profile_step.py halonet26t --top 40
    python benchmarks/profile_step.py maxvit_pico --quick      # batch 2 (smoke run)

Runs one step of `benchmarks/models.py`'s train step under `jax.profiler.trace`, reads the trace back, and names
each XLA:CPU thunk by what its fused computation does: `conv` (with window and dimension labels: a weight gradient
shows the whole image as its window), `dot` (YNNPACK or Eigen), or `other` (elementwise, reductions, copies).
Times are summed per thread, so parallel work counts once per thread; compare totals between two versions of the
code, not with the step's wall time. Output: tables by kind and by op, and results/profile_<model>.json.
Reading the trace uses JAX's internal `_profile_data` module; where it is missing the script says so.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from benchmarks.common import print_table, write_json
from benchmarks.models import NUM_CLASSES, REPRESENTATIVES, build_ours, ours_calls
from jaxattn.models.layers.malloc import keep_freed_memory

_FUSION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) fusion\(.*calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{$")
_PLAIN = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w+)\(")
_CONV = re.compile(r"convolution\(.*?window=\{([^}]*)\}, dim_labels=(\S+?),")
_SKIPPED = ("ThunkExecutor", "end:", "SlinkyThreadPool")


def op_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Thunk name -> (kind, output shape) from the compiled module's text."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line) if not line.startswith(" ") else None
        if match:
            current = match.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    kinds = {}
    for line in hlo_text.splitlines():
        match = _FUSION.match(line)
        if match:
            name, shape, called = match.groups()
            kinds[name] = (_kind("\n".join(bodies.get(called, []))), shape)
            continue
        match = _PLAIN.match(line)  # an unfused instruction: Eigen dots and convolutions
        if match and match.group(3) in ("dot", "convolution"):
            name, shape, opcode = match.groups()
            kinds[name] = ("dot (Eigen)", shape) if opcode == "dot" else (_kind(line), shape)
    return kinds


def _kind(body: str) -> str:
    conv = _CONV.search(body)
    if conv:
        return f"conv {conv.group(1)} {conv.group(2)}"
    return "dot" if " dot(" in body else "other"


def thunk_times(trace_dir: str) -> collections.Counter:
    """Nanoseconds per thunk name, summed over XLA:CPU's threads, from the trace in `trace_dir`."""
    from jax._src.lib import _profile_data  # internal: the trace reader that ships with jaxlib
    path = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    times = collections.Counter()
    for plane in _profile_data.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if not any(skip in event.name for skip in _SKIPPED):
                    times[event.name] += event.duration_ns
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a registered vision model")
    parser.add_argument("--img", type=int, default=None, help="image size (default: the benchmark's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="batch 2")
    args = parser.parse_args(argv)
    keep_freed_memory()
    batch = 2 if args.quick else args.batch
    img = args.img or REPRESENTATIVES.get(args.model, (None,))[0]
    model = build_ours(args.model, img, {})
    img = img or (model.img_size[0] if isinstance(model.img_size, (tuple, list)) else int(model.img_size))
    images = jax.random.normal(jax.random.key(0), (batch, img, img, 3), jnp.float32)
    calls = ours_calls(model, images, jnp.arange(batch) % NUM_CLASSES)
    calls.train()
    calls.train()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            calls.train()
        try:
            times = thunk_times(trace_dir)
        except ImportError as e:
            print(f"cannot read the trace here ({e})")
            return
    kinds = op_kinds(calls.compiled_train.as_text())
    by_kind, count = collections.Counter(), collections.Counter()
    ops = []
    for name, ns in times.items():
        kind, shape = kinds.get(name, ("other", ""))
        group = kind.split(" ")[0] if not kind.startswith("dot") else kind
        by_kind[group] += ns
        count[group] += 1
        ops.append({"op": name, "ms": ns / 1e6, "kind": kind, "shape": shape})
    kind_rows = [{"kind": k, "ops": count[k], "ms": v / 1e6} for k, v in by_kind.most_common()]
    kind_rows.append({"kind": "total", "ops": sum(count.values()), "ms": sum(by_kind.values()) / 1e6})
    ops.sort(key=lambda row: -row["ms"])
    print(f"{args.model} @{img}, batch {batch}: {calls.flops / 1e9:.1f} GFLOP per train step")
    print_table(kind_rows, ["kind", "ops", "ms"])
    print()
    print_table(ops[:args.top], ["op", "ms", "shape", "kind"])
    write_json(f"profile_{args.model}", {"kinds": kind_rows, "ops": ops, "gflop_step": calls.flops / 1e9,
                                          "img": img, "batch": batch})


if __name__ == "__main__":
    main()
