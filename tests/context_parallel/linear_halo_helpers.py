"""Helpers shared by the LASP-2 and halo-exchange tests (importable: pytest puts this folder on `sys.path`)."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.testing import assert_allclose, random_inputs

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # XLA:CPU's backend passes: most of these tests' time
COLLECTIVE = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*?\s(all-gather|reduce-scatter|all-reduce|collective-permute|"
                        r"all-to-all)(?:-start)?\(")


def assert_values_and_grads_match(impl: Callable, reference: Callable, inputs: Sequence, *, names: Sequence[str],
                                  dtype=jnp.float32, seed: int = 0) -> None:
    """Outputs and input gradients (VJP of one random cotangent) of `impl` on `inputs` rounded to `dtype` against
    `reference` on the same values in fp32, with the harness's tolerances for `dtype`. Each side is ONE compiled
    function (forward and VJP together): half the compiles of `assert_matches_reference`, which is what these
    multi-device tests spend their time on), compiled without XLA's backend optimisations (the same numerics,
    a fraction of the compile time)."""
    def with_vjp(fn):
        def run(xs, cts):
            out, vjp = jax.vjp(fn, *xs)
            return out, vjp(cts)
        return lambda xs, cts: jax.jit(run).lower(xs, cts).compile(FAST_COMPILE)(xs, cts)

    low = tuple(jnp.asarray(x).astype(dtype) for x in inputs)
    high = tuple(x.astype(jnp.float32) for x in low)
    leaves, tree = jax.tree.flatten(jax.eval_shape(reference, *high))
    cts = list(random_inputs(seed + 1, [x.shape for x in leaves]))
    impl_leaves = jax.tree.leaves(jax.eval_shape(impl, *low))
    out_impl, grads_impl = with_vjp(impl)(low, tree.unflatten([c.astype(o.dtype) for c, o in zip(cts, impl_leaves)]))
    out_ref, grads_ref = with_vjp(reference)(high, tree.unflatten(cts))
    for i, (a, r) in enumerate(zip(jax.tree.leaves(out_impl), jax.tree.leaves(out_ref), strict=True)):
        assert_allclose(a, r, dtype=dtype, name=f"output {i}")
    for name, a, r in zip(names, grads_impl, grads_ref, strict=True):
        assert_allclose(a, r, dtype=dtype, kind="grad", name=f"d/d{name}")


def collective_bytes(fn: Callable, *args) -> dict[str, int]:
    """Bytes of each kind of collective in the compiled HLO of `fn(*args)` (result shapes, summed)."""
    totals: dict[str, int] = {}
    for dtype, dims, op in COLLECTIVE.findall(jax.jit(fn).lower(*args).compile().as_text()):
        bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
        size = int(np.prod([int(d) for d in dims.split(",") if d])) * bits // 8
        totals[op] = totals.get(op, 0) + size
    return totals
