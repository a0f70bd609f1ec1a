"""Dot-product attention: time and peak memory of `reference` (materialised logits) vs `xla` (blocked).

    python benchmarks/attention.py            # T = 1k, 2k, 4k, 8k, 16k (causal self-attention)
    python benchmarks/attention.py --quick    # T = 256, 512
    python benchmarks/attention.py --block-sparse   # xla, T = S = 16k, block mask density 1/2, 1/8, 1/32 vs dense
    python benchmarks/attention.py --decode         # xla, 1 / 8 / 64 new tokens against a 32k cache

`--block-sparse`: a random block mask with the same number of True key blocks in every query block (the diagonal
one plus random others), per head; `speedup` is the dense xla time (no mask) over the block-skipping time.
`--decode`: `kv_lengths` (what the softmax LM decodes with) against the boolean `[T, max_len]` mask it replaced.

Peak memory is what XLA plans for the compiled function (`memory_analysis()`: arguments + outputs +
temporaries), measured for the forward pass and for forward+backward (`jax.vjp`). Time is the median wall time of
the jitted call. Results: printed table and results/attention.json.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from benchmarks.common import compiled_memory, mib, print_table, time_fn, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-backward", action="store_true", help="skip forward+backward timing")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--block-sparse", action="store_true", help="block-sparse rows instead of the T sweep")
    parser.add_argument("--sparse-length", type=int, default=16384)
    parser.add_argument("--block", type=int, default=256, help="block_shape = (block, block)")
    parser.add_argument("--densities", type=float, nargs="*", default=[1 / 2, 1 / 8, 1 / 32])
    parser.add_argument("--decode", action="store_true", help="decode rows instead of the T sweep")
    parser.add_argument("--cache", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, nargs="*", default=[1, 8, 64])
    args = parser.parse_args(argv)
    if args.block_sparse:
        return block_sparse_rows(args)
    if args.decode:
        return decode_rows(args)
    lengths = [256, 512] if args.quick else args.lengths
    rows = []
    for t in lengths:
        keys = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(keys[0], (args.batch, t, args.heads, args.head_dim), jnp.float32)
        k = jax.random.normal(keys[1], (args.batch, t, args.kv_heads, args.head_dim), jnp.float32)
        v = jax.random.normal(keys[2], (args.batch, t, args.kv_heads, args.head_dim), jnp.float32)
        for impl in ("reference", "xla"):
            fwd = functools.partial(jaxattn.dot_product_attention, is_causal=True, implementation=impl)

            def fwd_bwd(q, k, v, fwd=fwd):
                out, vjp = jax.vjp(fwd, q, k, v)
                return vjp(out)

            row = {"T": t, "impl": impl}
            row["fwd_ms"] = 1e3 * time_fn(fwd, q, k, v)
            row["fwd_peak_MiB"] = mib(compiled_memory(fwd, q, k, v)["peak_bytes"])
            row["fwd_bwd_peak_MiB"] = mib(compiled_memory(fwd_bwd, q, k, v)["peak_bytes"])
            if not args.no_backward:
                row["fwd_bwd_ms"] = 1e3 * time_fn(fwd_bwd, q, k, v, repeats=1)
            rows.append(row)
            print_table([row], list(row))
    for t in lengths:
        ref, xla = (next(r for r in rows if r["T"] == t and r["impl"] == i) for i in ("reference", "xla"))
        ref["xla_memory_saving"] = xla["xla_memory_saving"] = ref["fwd_peak_MiB"] / xla["fwd_peak_MiB"]
    print()
    print_table(rows, list(rows[-1]))
    write_json("attention", {"config": vars(args), "rows": rows})


def _inputs(seed, b, t, s, n, k, h):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h), jnp.float32),
            jax.random.normal(keys[1], (b, s, k, h), jnp.float32),
            jax.random.normal(keys[2], (b, s, k, h), jnp.float32))


def _measure(fwd, q, k, v, backward=True):
    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fwd, q, k, v)
        return vjp(out)

    row = {"fwd_ms": 1e3 * time_fn(fwd, q, k, v), "fwd_peak_MiB": mib(compiled_memory(fwd, q, k, v)["peak_bytes"])}
    if backward:
        row["fwd_bwd_ms"] = 1e3 * time_fn(fwd_bwd, q, k, v, repeats=1)
        row["fwd_bwd_peak_MiB"] = mib(compiled_memory(fwd_bwd, q, k, v)["peak_bytes"])
    return row


def random_block_mask(seed, heads, grid, density):
    """`[1, heads, nq, nk]`: in every query block the diagonal key block plus random others, `density * nk` in all."""
    nq, nk = grid
    per_row = max(1, round(density * nk))
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, heads, nq, nk), bool)
    for n in range(heads):
        for i in range(nq):
            diagonal = min(i * nk // nq, nk - 1)
            others = rng.permutation([j for j in range(nk) if j != diagonal])[:per_row - 1]
            mask[0, n, i, [diagonal, *others]] = True
    return jnp.asarray(mask)


def block_sparse_rows(args):
    t = args.sparse_length
    q, k, v = _inputs(t, args.batch, t, t, args.heads, args.kv_heads, args.head_dim)
    backward = not args.no_backward
    dense = functools.partial(jaxattn.dot_product_attention, implementation="xla")
    base = {"T": t, "density": 1.0, "path": "dense xla", **_measure(dense, q, k, v, backward)}
    rows = [base]
    print_table(rows, list(base))
    grid = (-(-t // args.block),) * 2
    for density in args.densities:
        mask = random_block_mask(0, args.heads, grid, density)
        fwd = functools.partial(jaxattn.dot_product_attention, block_mask=mask, block_shape=(args.block,) * 2,
                                implementation="xla")
        row = {"T": t, "density": float(jnp.mean(mask)), "path": "block-sparse xla", **_measure(fwd, q, k, v, backward)}
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"]
        if backward:
            row["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        rows.append(row)
        print_table([row], list(row))
    print()
    print_table(rows, list(rows[-1]))
    write_json("attention_block_sparse", {"config": vars(args), "rows": rows})


def decode_rows(args):
    s = args.cache
    rows = []
    for t in args.new_tokens:
        q, k, v = _inputs(t, args.batch, t, s, args.heads, args.kv_heads, args.head_dim)
        pos = s - t  # the cache is full after these tokens
        lengths = jnp.full((args.batch,), pos + t, jnp.int32)
        mask = (jnp.arange(s)[None, :] <= (pos + jnp.arange(t))[:, None])[None, None]
        for name, kw in (("kv_lengths", dict(kv_lengths=lengths, is_causal=True)), ("bool mask", dict(mask=mask))):
            fwd = functools.partial(jaxattn.dot_product_attention, implementation="xla", **kw)
            row = {"cache": s, "new_tokens": t, "how": name, **_measure(fwd, q, k, v, backward=False)}
            rows.append(row)
            print_table([row], list(row))
    print()
    print_table(rows, list(rows[-1]))
    write_json("attention_decode", {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
