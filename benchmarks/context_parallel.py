"""Context-parallel attention: bytes each device sends per layer (from the compiled HLO) and CPU time.

For every registered strategy, sequence length T and device count n (forced host CPU devices, one subprocess per
n), the forward and forward+backward programs are compiled on a `{'context': n}` mesh; the collectives in the
compiled HLO (collective-permute, all-gather, all-to-all, reduce-scatter, all-reduce; loop bodies times their
trip counts) give the bytes the busiest device sends. Then both programs are timed (process CPU time, the wall
clock of a shared CPU machine measures the other jobs; wall time is recorded too). n host devices share the
machine's cores, so times here show overheads, not speed-ups. Prints a table, writes
`results/context_parallel.json` and `results/context_parallel.png` (bytes vs T per strategy).

    python benchmarks/context_parallel.py                  # T = 1k, 4k, 16k (timed up to 4k); n = 2, 4, 8; causal
    python benchmarks/context_parallel.py --quick          # smoke run: T = 1k, n = 2 and 4, one repeat
    python benchmarks/context_parallel.py --bytes-only     # compile and count, no timing (fast)
    python benchmarks/context_parallel.py --strategies ring ulysses --non-causal
    python benchmarks/context_parallel.py --bytes-only --devices 8 --strategies ring ring_window allgather_window

Adding a strategy (e.g. LASP-2, halo exchange): `register(Strategy(name, run, make_inputs, applies))` below, where
`run(mesh, *inputs)` returns the global output and `make_inputs(rng, T, args)` the global inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------------------
# Strategies


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable  # run(mesh, *inputs, args) -> global output
    make_inputs: Callable  # make_inputs(rng: np.random.Generator, T, args) -> tuple of global arrays
    applies: Callable = lambda T, n, args: True  # noqa: E731  (False: the row is skipped, e.g. heads % n)


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    STRATEGIES[strategy.name] = strategy


def _qkv(rng, T, args):
    import jax.numpy as jnp
    shapes = [(args.batch, T, args.heads, args.head_dim), (args.batch, T, args.kv_heads, args.head_dim),
              (args.batch, T, args.kv_heads, args.head_dim)]
    return tuple(jnp.asarray(rng.standard_normal(s, dtype="float32")) for s in shapes)


def _softmax(fn_name, **fixed):
    def run(mesh, q, k, v, args):
        import jaxattn.context_parallel as cp
        return getattr(cp, fn_name)(q, k, v, mesh=mesh, is_causal=args.causal, **fixed)
    return run


def _ulysses_applies(T, n, args):
    return args.heads % n == 0 and (args.kv_heads % n == 0 or n % args.kv_heads == 0)


# Inputs are random, so a "zigzag-ordered" row just declares them in zigzag order (as after a data pipeline's
# `zigzag_permute`); the `_natural` row pays the reshuffle of q, k, v and out into and out of that order.
register(Strategy("ring", _softmax("ring_attention", zigzag_order=True), _qkv))
register(Strategy("ring_natural", _softmax("ring_attention"), _qkv, lambda T, n, args: args.causal))
register(Strategy("ring_contiguous", _softmax("ring_attention", load_balance=False), _qkv,
                  lambda T, n, args: args.causal))
register(Strategy("allgather", _softmax("allgather_attention", zigzag_order=True), _qkv))
register(Strategy("ulysses", _softmax("ulysses_attention"), _qkv, _ulysses_applies))


def _windowed(fn_name):
    """A local window of `--window` tokens back (and ahead when non-causal): only border tokens travel."""
    def run(mesh, q, k, v, args):
        import jaxattn.context_parallel as cp
        return getattr(cp, fn_name)(q, k, v, mesh=mesh, is_causal=args.causal,
                                    local_window_size=(args.window, 0 if args.causal else args.window))
    return run


register(Strategy("ring_window", _windowed("ring_attention"), _qkv))
register(Strategy("allgather_window", _windowed("allgather_attention"), _qkv))

# LASP-2 and halo exchange (lasp2, halo_na1d, halo_na2d, halo_halonet): their own module.
from benchmarks import context_parallel_linear_halo  # noqa: E402

for _strategy in context_parallel_linear_halo.strategies(Strategy):
    register(_strategy)

# ------------------------------------------------------------------------------------------------------------
# Bytes sent, from compiled HLO text

_COLLECTIVES = ("collective-permute", "all-gather", "all-to-all", "reduce-scatter", "all-reduce")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")


def _type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def _group_size(rest: str, n: int) -> int:
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if groups:
        return len(groups.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
    return int(iota.group(2)) if iota else n


def _sent_bytes(op: str, result_bytes: int, operand_bytes: int, rest: str, n: int) -> list[int]:
    """Bytes each of the n devices sends for one collective (ring algorithms for gather/scatter/reduce)."""
    if op == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", rest.split("source_target_pairs=")[1]) if \
            "source_target_pairs=" in rest else []
        sent = [0] * n
        for src, dst in pairs:
            if src != dst and int(src) < n:
                sent[int(src)] += operand_bytes
        return sent
    g = _group_size(rest, n)
    per = {"all-gather": operand_bytes * (g - 1), "all-to-all": operand_bytes * (g - 1) // g,
           "reduce-scatter": operand_bytes * (g - 1) // g, "all-reduce": 2 * operand_bytes * (g - 1) // g}[op]
    return [per] * n


def collective_bytes(hlo_text: str, n: int) -> dict:
    """Max over devices of the bytes sent, and the collective count, of a compiled SPMD HLO module."""
    comps, current, entry = {}, None, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if head:
            current = head.group(2)
            comps[current] = {"types": {}, "lines": []}
            entry = current if head.group(1) else entry
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current]["lines"].append(line)
    types = {}
    for comp in comps.values():
        for line in comp["lines"]:
            m = _INSTR.match(line)
            if m:
                types[m.group(1)] = m.group(2)
    cache = {}

    def visit(name):
        if name in cache:
            return cache[name]
        sent, count = [0] * n, 0
        for line in comps.get(name, {"lines": []})["lines"]:
            m = _INSTR.match(line)
            if not m:
                continue
            result_type, op, rest = m.group(2), m.group(3), m.group(4)
            base = op[:-6] if op.endswith("-start") else op
            if base in _COLLECTIVES and not op.endswith("-done"):
                operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
                operand_bytes = sum(_type_bytes(types.get(o, "")) for o in operands)
                sent = [a + b for a, b in zip(sent, _sent_bytes(base, _type_bytes(result_type), operand_bytes,
                                                                rest, n))]
                count += 1
            trips = 1
            if op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trips = int(trip.group(1)) if trip else 1
            for callee in re.findall(r"(?:body|calls|to_apply|branch_computations=\{|true_computation|"
                                     r"false_computation)=?%([\w.\-]+)", rest):
                sub_sent, sub_count = visit(callee)
                sent = [a + trips * b for a, b in zip(sent, sub_sent)]
                count += trips * sub_count
        cache[name] = (sent, count)
        return cache[name]

    sent, count = visit(entry)
    return {"bytes": max(sent) if sent else 0, "collectives": count}


# ------------------------------------------------------------------------------------------------------------
# Worker: one device count, in its own process


def _time(fn, inputs, repeats):
    import jax
    jax.block_until_ready(fn(*inputs))
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*inputs))
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def worker(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = []
    for name in args.strategies:
        strategy = STRATEGIES[name]
        for T in args.lengths:
            if not strategy.applies(T, n, args):
                continue
            inputs = strategy.make_inputs(np.random.default_rng(0), T, args)
            fwd = jax.jit(lambda *xs, s=strategy: s.run(mesh, *xs, args))

            def loss(*xs, s=strategy):
                return jnp.sum(s.run(mesh, *xs, args).astype(jnp.float32))
            fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))
            row = {"strategy": name, "devices": n, "T": T}
            for tag, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                compiled = fn.lower(*inputs).compile()
                stats = collective_bytes(compiled.as_text(), n)
                row[f"{tag}_MiB"] = stats["bytes"] / 2 ** 20
                row[f"{tag}_collectives"] = stats["collectives"]
                if not args.bytes_only and T <= args.time_max_len:
                    row[f"{tag}_wall_ms"], row[f"{tag}_cpu_ms"] = (1e3 * t for t in _time(compiled, inputs,
                                                                                         args.repeats))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--strategies", nargs="+", default=None, help="default: all registered")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--window", type=int, default=512, help="tokens of local window for the *_window rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bytes-only", action="store_true", help="count bytes from the compiled HLO, do not time")
    p.add_argument("--time-max-len", type=int, default=4096,
                   help="time only up to this length (longer rows: bytes only; CPU attention is slow)")
    p.add_argument("--quick", action="store_true", help="smoke run: T = 1k, n = 2 and 4, one repeat")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="context_parallel", help="results/<out>.json and .png")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.devices, args.repeats = args.lengths[:1], [n for n in args.devices if n <= 4][:2], 1
    args.strategies = args.strategies or list(STRATEGIES)
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}; registered: {sorted(STRATEGIES)}")
    return args


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    devices = sorted({r["devices"] for r in rows})
    fig, axes = plt.subplots(1, len(devices), figsize=(4.5 * len(devices), 4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], devices):
        for i, name in enumerate(dict.fromkeys(r["strategy"] for r in rows)):
            pts = sorted((r["T"], r["fwd_bwd_MiB"]) for r in rows if r["devices"] == n and r["strategy"] == name)
            if pts:  # markers and dashes tell apart strategies whose lines coincide
                ax.plot(*zip(*pts), marker="os^vDx*"[i % 7], linestyle=("-", "--", ":")[i % 3], label=name)
        ax.set(title=f"{n} devices", xlabel="sequence length T", xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("MiB sent per device (fwd+bwd, one layer)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker_out:
        rows = worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(rows, f)
        return
    from benchmarks import common
    from jaxattn.testing.devices import device_env

    rows = []
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--quick"]
    for n in args.devices:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out_path = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--worker-out", out_path,
               "--lengths", *map(str, args.lengths), "--repeats", str(args.repeats),
               "--strategies", *args.strategies]
        subprocess.run(cmd, env=device_env(n), check=True)
        with open(out_path) as f:
            rows += json.load(f)
        os.unlink(out_path)
    columns = ["strategy", "devices", "T", "fwd_MiB", "fwd_bwd_MiB", "fwd_collectives", "fwd_bwd_collectives"]
    if not args.bytes_only:
        columns += ["fwd_cpu_ms", "fwd_bwd_cpu_ms", "fwd_wall_ms", "fwd_bwd_wall_ms"]
    print()
    common.print_table(rows, columns)
    config = {k: v for k, v in vars(args).items() if k != "worker_out"}
    common.write_json(args.out, {"config": config, "rows": rows})
    _plot(rows, common.RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
