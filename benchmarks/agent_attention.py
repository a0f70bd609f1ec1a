"""Agent attention vs softmax attention: time per token and compiled memory at 4k / 16k / 64k tokens.

Self-attention over `T` tokens (`S = T`), `n` agents with per-head biases `[N, n, T]` and `[N, T, n]` (as the
`AgentAttention` layer passes them). Agent attention (`jaxattn.agent_attention`, default implementation) should
cost the same per token at every length: time and memory linear in T. Softmax attention (`dot_product_attention`,
default implementation, no mask) is quadratic in time; above `--softmax-max-len` it is compiled for its memory but
not run. Prints a table and writes `results/agent_attention[_bwd].json`.

    python benchmarks/agent_attention.py               # T = 4k, 16k, 64k, forward, fp32
    python benchmarks/agent_attention.py --backward    # forward + backward (value_and_grad of all inputs)
    python benchmarks/agent_attention.py --quick       # smoke run: T = 1k, 4k, one repeat
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxattn  # noqa: E402
from benchmarks.common import mib, print_table, write_json  # noqa: E402

COLUMNS = ["T", "agent_us_per_token", "agent_temp_mib", "softmax_us_per_token", "softmax_temp_mib",
           "agent_faster", "softmax_over_agent_memory"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--softmax-max-len", type=int, default=16384,
                   help="run softmax attention up to this length; longer ones are compiled for memory only")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--agents", type=int, default=49, help="agent tokens (the paper's 7 x 7)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: T = 1k, 4k, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [1024, 4096], 1
    return args


def build(args, t):
    """`(agent_fn, softmax_fn, agent_inputs, softmax_inputs)` at `T = S = t`; both fns map inputs to a program
    output (the forward, or the loss with gradients of every input)."""
    rng = np.random.default_rng(t)
    normal = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape, np.float32)).astype(args.dtype)  # noqa: E731
    tokens = (args.batch, t, args.heads, args.head_dim)
    q, k, v = normal(*tokens), normal(*tokens), normal(*tokens)
    agents = normal(args.batch, args.agents, args.heads, args.head_dim)
    key_bias, query_bias = normal(args.heads, args.agents, t), normal(args.heads, t, args.agents)

    def agent(q, k, v, agents, key_bias, query_bias):
        return jaxattn.agent_attention(q, k, v, agents, key_bias=key_bias, query_bias=query_bias)

    def softmax(q, k, v):
        return jaxattn.dot_product_attention(q, k, v)

    def program(fn, n_inputs):
        if not args.backward:
            return jax.jit(fn)
        loss = lambda *xs: jnp.sum(fn(*xs).astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_inputs))))

    return program(agent, 6), program(softmax, 3), (q, k, v, agents, key_bias, query_bias), (q, k, v)


def temp_mib(program, inputs):
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    stats = program.lower(*specs).compile().memory_analysis()
    return None if stats is None else mib(stats.temp_size_in_bytes)


def seconds(program, inputs, repeats, cpu_clock):
    """Median over `repeats` calls after a warm-up: process CPU seconds on the CPU backend (on a shared machine the
    wall clock measures the other jobs), wall seconds elsewhere."""
    jax.block_until_ready(program(*inputs))
    clock = time.process_time if cpu_clock else time.perf_counter
    samples = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(program(*inputs))
        samples.append(clock() - start)
    return statistics.median(samples)


def main(argv=None):
    args = parse_args(argv)
    cpu_clock = jax.default_backend() == "cpu"
    mode = "fwd+bwd" if args.backward else "fwd"
    print(f"{jax.devices()[0]} | batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
          f"{args.agents} agents, {args.dtype}, {mode} | us per token ({'process CPU' if cpu_clock else 'wall'} "
          f"time, median of {args.repeats}); compiled temporaries in MiB")
    rows = []
    for t in args.lengths:
        agent, softmax, agent_inputs, softmax_inputs = build(args, t)
        tokens = args.batch * t
        row = {"T": t, "agent_us_per_token": seconds(agent, agent_inputs, args.repeats, cpu_clock) / tokens * 1e6,
               "agent_temp_mib": temp_mib(agent, agent_inputs), "softmax_temp_mib": temp_mib(softmax, softmax_inputs)}
        if t <= args.softmax_max_len:
            row["softmax_us_per_token"] = seconds(softmax, softmax_inputs, args.repeats, cpu_clock) / tokens * 1e6
            row["agent_faster"] = row["softmax_us_per_token"] / row["agent_us_per_token"]
        else:
            row["softmax_us_per_token"] = "not run"
        if row["agent_temp_mib"] and row["softmax_temp_mib"] is not None:
            row["softmax_over_agent_memory"] = row["softmax_temp_mib"] / row["agent_temp_mib"]
        rows.append(row)
        print_table([row], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    per_token = [r["agent_us_per_token"] for r in rows]
    memory_per_token = [r["agent_temp_mib"] / r["T"] for r in rows if r["agent_temp_mib"] is not None]
    time_ratio = max(per_token) / min(per_token)
    memory_ratio = max(memory_per_token) / min(memory_per_token) if memory_per_token else None
    print(f"agent attention per token, max/min over T = {rows[0]['T']}..{rows[-1]['T']}: time {time_ratio:.2f}x, "
          f"temporaries {memory_ratio:.2f}x (1.0 = linear in T)")
    write_json("agent_attention_bwd" if args.backward else "agent_attention",
               {"config": vars(args), "mode": mode, "rows": rows, "agent_time_per_token_max_over_min": time_ratio,
                "agent_memory_per_token_max_over_min": memory_ratio})
    return rows


if __name__ == "__main__":
    main()
