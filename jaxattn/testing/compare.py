"""Compare an implementation with a reference: outputs and input gradients, fp32 and bf16.

The reference always runs in fp32 on the same (already rounded) inputs, so the tolerance measures the error of
the implementation under test alone. Errors are relative to the largest magnitude of the reference, which keeps one
tolerance meaningful for outputs and for gradients of any scale.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Max error allowed, as a fraction of max|reference| (per output or gradient array). Stated once, used everywhere.
TOLERANCES = {
    jnp.dtype(jnp.float32): {"out": 2e-5, "grad": 1e-4},
    jnp.dtype(jnp.bfloat16): {"out": 2e-2, "grad": 4e-2},
    jnp.dtype(jnp.float16): {"out": 4e-3, "grad": 1e-2},
}


def tolerance(dtype, kind: str) -> float:
    return TOLERANCES[jnp.dtype(dtype)][kind]


def assert_allclose(actual, expected, *, dtype=jnp.float32, kind="out", name="output", rel=None):
    """`max|actual - expected| <= rel * max(max|expected|, 1e-3)`; NaN/inf in `actual` always fails."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {actual.shape} != reference shape {expected.shape}")
    finite_ref = np.isfinite(expected)
    if not np.array_equal(np.isfinite(actual), finite_ref) or not np.array_equal(actual[~finite_ref],
                                                                                   expected[~finite_ref]):
        raise AssertionError(f"{name}: non-finite entries differ from the reference")
    rel = tolerance(dtype, kind) if rel is None else rel
    scale = max(float(np.max(np.abs(expected[finite_ref]), initial=0.0)), 1e-3)
    err = float(np.max(np.abs(actual[finite_ref] - expected[finite_ref]), initial=0.0))
    if err > rel * scale:
        idx = np.unravel_index(np.argmax(np.where(finite_ref, np.abs(actual - expected), 0)), actual.shape)
        raise AssertionError(
            f"{name} ({jnp.dtype(dtype).name}): max error {err:.3g} > {rel:g} x {scale:.3g}; worst at {idx}: "
            f"{actual[idx]:.6g} vs reference {expected[idx]:.6g}")


def random_inputs(seed: int, shapes: Sequence[Sequence[int]], dtype=jnp.float32, scale: float = 1.0):
    """Normal random arrays of the given shapes, rounded to `dtype`.

    Drawn with numpy: eager `jax.random` compiles once per new shape, which dominates small tests.
    """
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray((scale * rng.standard_normal(tuple(s))).astype(np.float32)).astype(dtype)
                 for s in shapes)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def assert_matches_reference(impl: Callable, reference: Callable, inputs: Sequence, *, dtype=jnp.float32,
                             grads: bool = True, seed: int = 0, names: Sequence[str] | None = None,
                             rel_out: float | None = None, rel_grad: float | None = None, jit: bool = True):
    """Checks `impl(*inputs)` against `reference(*inputs)` and, with `grads`, their VJPs for a random cotangent.

    `inputs` are the differentiable arrays (close over everything else). They are cast to `dtype` for `impl` and
    those same rounded values are upcast to fp32 for `reference`. Outputs may be an array or a tuple of arrays;
    integer outputs are compared exactly. With `jit` (default) both functions are compiled whole, which is
    much faster in tests than op-by-op execution.
    """
    if jit:
        impl, reference = jax.jit(impl), jax.jit(reference)
    names = names or [f"input{i}" for i in range(len(inputs))]
    low = tuple(jnp.asarray(x).astype(dtype) for x in inputs)
    high = tuple(x.astype(jnp.float32) for x in low)
    out_impl, vjp_impl = jax.vjp(impl, *low)
    out_ref, vjp_ref = jax.vjp(reference, *high)
    outs_impl, outs_ref = _as_tuple(out_impl), _as_tuple(out_ref)
    if len(outs_impl) != len(outs_ref):
        raise AssertionError(f"impl returns {len(outs_impl)} outputs, reference {len(outs_ref)}")
    for i, (a, r) in enumerate(zip(outs_impl, outs_ref)):
        assert_allclose(a, r, dtype=dtype, kind="out", name=f"output {i}", rel=rel_out)
    if not grads:
        return
    keys = jax.random.split(jax.random.key(seed + 1), len(outs_ref))
    cotangents = tuple(
        jax.random.normal(k, r.shape, jnp.float32) if jnp.issubdtype(r.dtype, jnp.floating) else None
        for k, r in zip(keys, outs_ref))
    # Zero the cotangent where the reference output is not finite (e.g. lse of fully masked rows).
    cotangents = tuple(None if c is None else jnp.where(jnp.isfinite(r), c, 0.0)
                       for c, r in zip(cotangents, outs_ref))

    def cast(ct, like):
        return np.zeros(like.shape, jax.dtypes.float0) if ct is None else ct.astype(like.dtype)

    ct_impl = tuple(cast(c, o) for c, o in zip(cotangents, outs_impl))
    ct_ref = tuple(cast(c, o) for c, o in zip(cotangents, outs_ref))
    unpack = (lambda c: c) if isinstance(out_ref, (tuple, list)) else (lambda c: c[0])
    g_impl = vjp_impl(type(out_impl)(ct_impl) if isinstance(out_impl, (tuple, list)) else unpack(ct_impl))
    g_ref = vjp_ref(type(out_ref)(ct_ref) if isinstance(out_ref, (tuple, list)) else unpack(ct_ref))
    for name, a, r in zip(names, g_impl, g_ref):
        assert_allclose(a, r, dtype=dtype, kind="grad", name=f"d/d{name}", rel=rel_grad)
