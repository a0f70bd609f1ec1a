"""Shared benchmark helpers: timing, compiled peak memory, a printed table and JSON/PNG output under results/."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import time

import jax

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def compiled_memory(fn, *args) -> dict:
    """Bytes XLA plans for `jit(fn)(*args)`: arguments, outputs, temporaries; `peak` = their sum (no aliasing)."""
    analysis = jax.jit(fn).trace(*args).lower().compile().memory_analysis()
    out = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


def median_seconds(call, *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of `call()` (which must block until its work is done) after `warmup` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_fn(fn, *args, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of `jit(fn)(*args)` after compilation and warm-up."""
    jitted = jax.jit(fn)
    return median_seconds(lambda: jax.block_until_ready(jitted(*args)), repeats=repeats, warmup=warmup)


def environment() -> dict:
    return {
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(name: str, payload: dict) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    print(f"wrote {path}")
    return path


def mib(n_bytes: float) -> float:
    return n_bytes / 2 ** 20
