"""Where metrics go: `<workdir>/metrics.jsonl` (one JSON object per logged step), TensorBoard event files
(tensorboardX, no TensorFlow) in `<workdir>/tensorboard`, a progress bar on a terminal, and `<workdir>/curves.png`
at the end. Only process 0 writes; elsewhere every method does nothing.

On resume, lines for steps after the restored checkpoint (written by the run that was interrupted) are dropped from
`metrics.jsonl`, so the file always describes one consistent run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
_SHOWN = ("train/loss", "eval/accuracy", "eval/bits_per_byte", "train/examples_per_s", "train/tokens_per_s")


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(value):
    value = float(value) if hasattr(value, "__float__") else value
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def _summary_writer():
    """tensorboardX's `SummaryWriter`, imported without PyTorch: tensorboardX imports torch whenever it is
    installed (15 s here) although scalars never need it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` fail fast inside tensorboardX's optional import
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir, self.total_steps = workdir, total_steps
        self._tb = self._bar = self._clock = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [m for m in read_metrics(workdir) if m.get("step", 0) <= start_step]
        self._path = os.path.join(workdir, METRICS_FILE)
        with open(self._path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)
        self._tb = _summary_writer()(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
        if sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, float):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()
        shown = {k.split("/")[-1]: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in record.items()
                 if k in _SHOWN}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            return
        now = time.monotonic()
        if self._clock is None:
            self._clock = (step, now)  # ETA from the rate after the first logged step (compilation excluded)
        done, since = step - self._clock[0], now - self._clock[1]
        eta = f" eta={(self.total_steps - step) * since / done:.0f}s" if done > 0 else ""
        print(f"step {step}/{self.total_steps} " + " ".join(f"{k}={v}" for k, v in shown.items()) + eta, flush=True)

    def progress(self, step: int):
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close(self):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        plot_curves(self.workdir)


def plot_curves(workdir: str, path: str | None = None) -> str | None:
    """Plots every scalar of `metrics.jsonl` against the step, one panel per metric; returns the PNG path."""
    records = read_metrics(workdir)
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    if not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = path or os.path.join(workdir, CURVES_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
