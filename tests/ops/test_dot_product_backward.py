"""dot_product_attention_backward: the op's gradients from a saved (out, lse), against jax.vjp of the reference.

Also the property ring attention relies on: with the GLOBAL out/lse of a softmax merged over key blocks, the
per-block backwards sum to the whole gradient.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn.core import softmax
from jaxattn.dot_product import dot_product_attention, dot_product_attention_backward
from jaxattn.testing import assert_allclose, random_inputs


def _expected(q, k, v, d_out, d_lse, kw):
    """jax.vjp of the materialising reference forward, in fp32 on the same rounded inputs."""
    f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, kw.get("bias"))]
    rest = {a: b for a, b in kw.items() if a != "bias"}

    def fwd(q_, k_, v_, bias_):
        return dot_product_attention(q_, k_, v_, bias_, return_lse=True, implementation="reference", **rest)
    _, vjp = jax.vjp(fwd, *f32)
    d_lse = jnp.zeros((q.shape[0], q.shape[2], q.shape[1])) if d_lse is None else d_lse
    grads = vjp((d_out.astype(jnp.float32), d_lse))
    return grads if kw.get("bias") is not None else grads[:3]


def _check(dims, kw, dtype, impl, *, with_d_lse=False, seed=0):
    b, t, s, n, kh, h, hv = dims
    q, k, v, d_out = random_inputs(seed, [(b, t, n, h), (b, s, kh, h), (b, s, kh, hv), (b, t, n, hv)], dtype)
    arrays = {"d_lse": random_inputs(seed + 1, [(b, n, t)])[0] if with_d_lse else None}
    if "bias" in kw:
        arrays["bias"] = random_inputs(seed + 2, [kw["bias"]], dtype)[0]
    if "query_segment_ids" in kw:
        arrays["query_segment_ids"] = jnp.arange(t)[None].repeat(b, 0) * 3 // t
        arrays["key_segment_ids"] = jnp.arange(s)[None].repeat(b, 0) * 3 // s
    static = {a: x for a, x in kw.items() if a not in arrays}

    @jax.jit  # one compile per case: forward, the backward under test and the expected VJP together
    def run(q, k, v, d_out, arrays):
        d_lse = arrays.pop("d_lse")
        opts = dict(static, **arrays)
        out, lse = dot_product_attention(q, k, v, return_lse=True, implementation="xla", **opts)
        got = dot_product_attention_backward(q, k, v, out, lse, d_out, d_lse=d_lse, implementation=impl, **opts)
        return got, _expected(q, k, v, d_out, d_lse, opts)

    got, want = run(q, k, v, d_out, arrays)
    assert len(got) == len(want)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert a.dtype == (arrays["bias"].dtype if name == "dbias" else dtype)
        assert_allclose(a, e, dtype=dtype, kind="grad", name=f"{impl} {name}")


CASES = [
    # (B, T, S, N, K, H, Hv), options
    ((2, 37, 37, 4, 2, 8, 8), {"is_causal": True}),  # GQA
    ((1, 20, 45, 4, 1, 8, 12), {"is_causal": True}),  # MQA, T < S (bottom-right), Hv != H
    ((1, 45, 20, 2, 2, 8, 8), {"is_causal": True}),  # T > S: rows that see nothing (lse -inf)
    ((1, 1, 33, 2, 1, 8, 8), {"is_causal": True}),  # one query
    ((1, 40, 40, 4, 2, 8, 8), {"local_window_size": (5, 3)}),
    ((2, 30, 30, 4, 2, 8, 8), {"bias": (1, 4, 30, 30), "scale": 0.3}),
    ((2, 30, 30, 2, 2, 8, 8), {"bias": (1, 30), "is_causal": True}),  # a key bias, broadcast over rows
    ((2, 30, 24, 2, 1, 8, 8), {"query_segment_ids": True, "local_window_size": 6}),
]


@pytest.mark.parametrize("dims,kw", CASES)
def test_xla_matches_vjp_of_reference(dims, kw):
    _check(dims, kw, jnp.float32, "xla", with_d_lse=dims[1] == 37)


@pytest.mark.parametrize("dims,kw", [CASES[0], CASES[5], CASES[7]])  # causal GQA, bias, segments + window
def test_xla_bf16(dims, kw):
    _check(dims, kw, jnp.bfloat16, "xla")


def test_reference_backward_matches_vjp_of_reference():
    _check(*CASES[5], jnp.float32, "reference", with_d_lse=True)


def test_pallas_adapter_interpreted():
    """The Pallas kernel backward through its adapter (interpreter on CPU): GQA, causal, bias, segments."""
    kw = {"is_causal": True, "bias": (1, 4, 24, 24), "query_segment_ids": True}
    _check((1, 24, 24, 4, 2, 8, 8), kw, jnp.float32, "pallas", with_d_lse=True)


def test_none_is_xla_on_cpu():
    q, k, v, d_out = random_inputs(3, [(1, 9, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8)])

    @jax.jit
    def run(q, k, v, d_out):
        out, lse = dot_product_attention(q, k, v, return_lse=True)
        return [dot_product_attention_backward(q, k, v, out, lse, d_out, implementation=i) for i in (None, "xla")]
    a, b = run(q, k, v, d_out)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_with_global_out_lse_sum_to_the_gradient(causal):
    """Split the keys in two: each block's backward with the merged (global) out/lse gives that block's dk/dv
    and its share of dq exactly (what ring attention sums step by step)."""
    b, t, n, kh, h = 1, 24, 4, 2, 8
    q, k, v, d_out = random_inputs(5, [(b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, t, n, h)])
    c = 10
    # A key block of a causal mask is not causal in its own coordinates: pass the global mask's columns.
    visible = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]

    @jax.jit
    def run(q, k, v, d_out):
        out, lse = dot_product_attention(q, k, v, return_lse=True, is_causal=causal)
        parts = [dot_product_attention_backward(q, k[:, sl], v[:, sl], out, lse, d_out,
                                                mask=visible[:, sl] if causal else None)
                 for sl in (slice(0, c), slice(c, t))]
        return parts, _expected(q, k, v, d_out, None, {"is_causal": causal})

    parts, want = run(q, k, v, d_out)
    assert_allclose(parts[0][0] + parts[1][0], want[0], kind="grad", name="dq")
    assert_allclose(jnp.concatenate([parts[0][1], parts[1][1]], 1), want[1], kind="grad", name="dk")
    assert_allclose(jnp.concatenate([parts[0][2], parts[1][2]], 1), want[2], kind="grad", name="dv")


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_precomputed_delta_replaces_out_and_d_lse(impl):
    """`delta` (with `out=None`, as ring attention passes it) gives the grads `out`/`d_lse` give, and those of the
    reference's VJP: causal GQA with sinks (their gradient from the given delta too)."""
    b, t, n, kh, h = 1, 24, 4, 2, 8
    q, k, v, d_out = random_inputs(11, [(b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, t, n, h)])
    d_lse, sinks = random_inputs(12, [(b, n, t), (n,)])
    kw = {"is_causal": True, "sinks": sinks}

    @jax.jit
    def run(q, k, v, d_out, d_lse):
        out, lse = dot_product_attention(q, k, v, return_lse=True, implementation="xla", **kw)
        delta = softmax.backward_delta_heads_last(out, d_out, d_lse)
        from_out = dot_product_attention_backward(q, k, v, out, lse, d_out, d_lse=d_lse, implementation=impl, **kw)
        from_delta = dot_product_attention_backward(q, k, v, None, lse, d_out, delta=delta, implementation=impl,
                                                    **kw)

        def fwd(q_, k_, v_, sinks_):
            return dot_product_attention(q_, k_, v_, return_lse=True, is_causal=True, sinks=sinks_,
                                         implementation="reference")
        return from_out, from_delta, jax.vjp(fwd, q, k, v, sinks)[1]((d_out, d_lse))

    from_out, from_delta, want = run(q, k, v, d_out, d_lse)
    for name, a, b_, e in zip(("dq", "dk", "dv", "dsinks"), from_out, from_delta, want):
        np.testing.assert_allclose(b_, a, rtol=1e-6, atol=1e-6, err_msg=f"{impl} {name}")
        assert_allclose(b_, e, kind="grad", name=f"{impl} {name}")


@settings(max_examples=4)
@given(t=st.integers(1, 20), s=st.integers(1, 20), group=st.sampled_from([1, 2]), causal=st.booleans())
def test_property_shapes(t, s, group, causal):
    _check((1, t, s, 2 * group, 2, 4, 4), {"is_causal": causal}, jnp.float32, "xla", seed=t * 31 + s)


def test_rejects_bad_inputs():
    q, k, v, d_out = random_inputs(7, [(1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4)])
    out, lse = dot_product_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="`lse` must have shape"):
        dot_product_attention_backward(q, k, v, out, jnp.swapaxes(lse, 1, 2), d_out)
    with pytest.raises(ValueError, match="`d_out` must have shape"):
        dot_product_attention_backward(q, k, v, out, lse, d_out[:, :4])
    with pytest.raises(ValueError, match="`out` must have shape"):
        dot_product_attention_backward(q, k, v, out[..., :2], lse, d_out)
    with pytest.raises(ValueError, match="`d_lse` must have shape"):
        dot_product_attention_backward(q, k, v, out, lse, d_out, d_lse=lse[:, :1])
    delta = softmax.backward_delta_heads_last(out, d_out)
    with pytest.raises(ValueError, match="`d_lse` or a precomputed `delta`, not both"):
        dot_product_attention_backward(q, k, v, None, lse, d_out, d_lse=lse, delta=delta)
    with pytest.raises(ValueError, match="`out` is required unless a precomputed `delta`"):
        dot_product_attention_backward(q, k, v, None, lse, d_out)
    with pytest.raises(ValueError, match=r"`delta` must have shape \(1, 2, 8\)"):
        dot_product_attention_backward(q, k, v, None, lse, d_out, delta=jnp.swapaxes(delta, 1, 2))
    from jaxattn.kernels.flash_attention import pallas
    with pytest.raises(ValueError, match="not both"):
        pallas.flash_attention_backward(q, k, v, None, lse, d_out, d_lse=lse, delta=delta)
    with pytest.raises(ValueError, match="key"):  # the forward's own checks
        dot_product_attention_backward(q, k[..., :3], v, out, lse, d_out)
    with pytest.raises(ValueError, match="local_window_size"):
        dot_product_attention_backward(q, k, v, out, lse, d_out, local_window_size=-1)
    with pytest.raises(ValueError, match="does not support"):
        dot_product_attention_backward(q, k, v, out, lse, d_out, mask=jnp.ones((8, 8), bool),
                                       implementation="pallas")


# The Triton adapter, run end to end by the Triton interpreter in a child (`TRITON_INTERPRET=1`, the launcher
# unchanged on torch CPU tensors, as in tests/kernels/test_flash_attention_triton.py).
_TRITON_CHILD = r"""
import jax, jax.numpy as jnp
from jaxattn.kernels.common.verify import install_interpreted_jax_triton
install_interpreted_jax_triton()
from jaxattn.dot_product import common, dot_product_attention, kernel_backward, reference
from jaxattn.testing import assert_allclose, random_inputs

b, t, n, kh, h = 1, 24, 4, 2, 16
q, k, v, d_out, bias = random_inputs(0, [(b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, t, n, h), (1, n, t, t)])
d_lse = random_inputs(1, [(b, n, t)])[0]
seg = (jnp.arange(t)[None] * 3 // t).astype(jnp.int32)
spec, scale = common.MaskSpec(True, None, 0), h ** -0.5
out, lse = dot_product_attention(q, k, v, bias, is_causal=True, query_segment_ids=seg, key_segment_ids=seg,
                                 return_lse=True, implementation="xla")
got = kernel_backward.triton_backward(q, k, v, bias, None, seg, seg, out, lse, d_out, d_lse, scale=scale, spec=spec,
                                      want_dbias=True)
want = reference.attention_backward_reference(q, k, v, bias, None, seg, seg, out, lse, d_out, d_lse, scale=scale,
                                              spec=spec)
for name, a, e in zip(("dq", "dk", "dv", "dbias"), got, want):
    assert_allclose(a, e, kind="grad", name=name)
print("ok triton backward", flush=True)
"""


def test_triton_adapter_interpreted():
    import os

    from jaxattn.kernels.common import verify
    missing = verify.triton_available()
    if missing is not None:
        pytest.skip(missing)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = verify.run_triton_interpreted(_TRITON_CHILD, cwd=root, timeout=600)
    assert "ok triton backward" in out, out
