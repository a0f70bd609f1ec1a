"""The softmax LM's attention variants on the stdlib recipe (issue 17): the baseline, gated attention, attention
sinks and mixture-of-heads trained with the same data, steps and seed; bits per byte (train, at equal steps, and
held-out at the end when the runs got there) and seconds per step, as a table and `results/lm_variants.json`.

    # train each variant (same seed, same steps), then summarise
    for v in "" :tiny_gated :tiny_sinks :tiny_moh; do
      python -m train.main --config configs/softmax_lm.py$v --config.num_train_steps=150 --config.log_every=25 \
        --config.eval_every=0 --config.eval_max_examples=128 --workdir workdirs/lm_variants/${v#:}
    done
    python benchmarks/lm_variants.py --workdirs workdirs/lm_variants

A workdir named `base` (or empty variant) is the baseline. Step time is the logged tokens/s over the tokens of a
step (batch x seq_len); the runs' machine and its load go with the numbers (`--note`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_json

VARIANTS = ("base", "tiny_gated", "tiny_sinks", "tiny_moh")


def read_run(workdir: pathlib.Path, tokens_per_step: int) -> dict:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in records if "train/bits_per_byte" in r}
    evals = [r for r in records if "eval/bits_per_byte" in r]
    speeds = [r["train/tokens_per_s"] for r in train.values() if r.get("train/tokens_per_s")]
    return {"train": {s: r["train/bits_per_byte"] for s, r in sorted(train.items())},
            "eval_bits_per_byte": evals[-1]["eval/bits_per_byte"] if evals else None,
            "eval_step": evals[-1]["step"] if evals else None,
            "seconds_per_step": tokens_per_step / speeds[-1] if speeds else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdirs", required=True, help="folder holding one workdir per variant")
    p.add_argument("--tokens-per-step", type=int, default=32 * 256, help="batch x seq_len of the runs")
    p.add_argument("--note", default="", help="the machine and its load, stored with the numbers")
    args = p.parse_args()
    root = pathlib.Path(args.workdirs)
    runs = {v: read_run(root / v, args.tokens_per_step) for v in VARIANTS if (root / v / "metrics.jsonl").exists()}
    steps = sorted(set.intersection(*(set(r["train"]) for r in runs.values()))) if runs else []
    at = steps[-1] if steps else None
    rows = [{"variant": v, "step": at, "train_bpb": round(r["train"][at], 4) if at else None,
             "eval_bpb": None if r["eval_bits_per_byte"] is None else round(r["eval_bits_per_byte"], 4),
             "s_per_step": None if r["seconds_per_step"] is None else round(r["seconds_per_step"], 2)}
            for v, r in runs.items()]
    print_table(rows, ["variant", "step", "train_bpb", "eval_bpb", "s_per_step"])
    path = write_json("lm_variants", {"note": args.note, "equal_step": at, "rows": rows, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
