"""TransNormer (lightning attention) vs the matched softmax LM: forward time and compiled peak memory over
sequence length, and decode tokens/s at batch 1 and 8.

    python benchmarks/lm.py            # T = 1k..16k, decode 128 steps
    python benchmarks/lm.py --quick    # smoke run: T = 256, 512, decode 16 steps
    python benchmarks/lm.py --model tiny --batch 1

Memory is what XLA plans for the jitted forward (arguments + outputs + temporaries, `compiled_memory`); the
logits `[B, T, vocab]` are part of the output. Decode runs `models.generate` (a 16-token prefill, then one token
per step in a compiled scan); the softmax KV cache is `prompt + steps` long.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import compiled_memory, mib, print_table, time_fn, write_json
from jaxattn import models

FAMILIES = ("transnormer", "softmax_lm")


def forward_rows(size, batch, lengths, time_limit_t):
    rows = []
    for family in FAMILIES:
        model = models.create_model(f"{family}_{size}", rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        fwd = lambda s, t: nnx.merge(graphdef, s)(t)  # noqa: E731
        for t in lengths:
            tok = jnp.zeros((batch, t), jnp.int32)
            mem = compiled_memory(fwd, state, tok)
            row = {"family": family, "T": t, "peak_MiB": mib(mem["peak_bytes"]), "temp_MiB": mib(mem["temp_bytes"]),
                   "logits_MiB": mib(batch * t * model.vocab_size * 4)}
            if t <= time_limit_t:
                row["fwd_ms"] = 1e3 * time_fn(fwd, state, tok, repeats=1 if t >= 8192 else 3)
            rows.append(row)
            print(row, flush=True)
    return rows


def decode_rows(size, batches, steps, prompt_len=16):
    rows = []
    for family in FAMILIES:
        model = models.create_model(f"{family}_{size}", rngs=nnx.Rngs(0))
        for b in batches:
            prompt = jnp.zeros((b, prompt_len), jnp.int32)
            jax.block_until_ready(models.generate(model, prompt, steps))  # compile
            start = time.perf_counter()
            jax.block_until_ready(models.generate(model, prompt, steps))
            sec = time.perf_counter() - start
            rows.append({"family": family, "batch": b, "steps": steps, "tokens_per_s": b * steps / sec})
            print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="tiny", help="size suffix: tiny, 385m, 1b, 7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--time-limit", type=int, default=16384, help="time the forward only up to this T")
    args = p.parse_args()
    lengths = (256, 512) if args.quick else (1024, 2048, 4096, 8192, 16384)
    steps = 16 if args.quick else 128
    fwd = forward_rows(args.model, args.batch, lengths, args.time_limit)
    print_table(fwd, ["family", "T", "fwd_ms", "peak_MiB", "temp_MiB", "logits_MiB"])
    dec = decode_rows(args.model, (1, 8), steps)
    print_table(dec, ["family", "batch", "steps", "tokens_per_s"])
    write_json("lm" + ("_quick" if args.quick else ""), {"model": args.model, "batch": args.batch,
                                                         "forward": fwd, "decode": dec})


if __name__ == "__main__":
    main()
