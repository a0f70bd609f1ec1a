"""Lightning attention: chunked (xla) == naive (reference) == token-by-token recurrence, forward and gradients."""
import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

import jaxattn
from jaxattn.core import dispatch
from jaxattn.lightning import api
from jaxattn.testing import assert_allclose, assert_matches_reference

F32, BF16 = jnp.float32, jnp.bfloat16


def _inputs(seed, b, t, n, h, hv, dtype=F32, scale=1.0):
    """q, k, v and an initial state, normal, rounded to `dtype`. Drawn with numpy: eager `jax.random` compiles
    once per new shape, which would dominate this file's time."""
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, t, n, h), (b, t, n, hv), (b, n, h, hv)]
    return tuple(jnp.asarray(scale * rng.standard_normal(s, np.float32)).astype(dtype) for s in shapes)


@functools.lru_cache(maxsize=None)
def _fn(implementation, *, decay, is_causal, init, block=64, n=2):
    """Jitted `(q, k, v, s0) -> out` or `(out, final_state)` (causal), cached so tests share compilations."""
    slopes = jaxattn.lightning_slopes(n) if decay else None

    def f(q, k, v, s0):
        return jaxattn.lightning_attention(
            q, k, v, slopes=slopes, is_causal=is_causal, block_size=block, initial_state=s0 if init else None,
            return_state=is_causal, implementation=implementation)
    return jax.jit(f)


def _recurrent(q, k, v, s0, slopes):
    """The token-by-token recurrence through the public decoding step: `(out [B, T, N, Hv], final_state)`."""
    def body(state, x):
        out, state = jaxattn.lightning_attention_step(*x, state, slopes=slopes)
        return state, out

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
    state, outs = jax.lax.scan(body, s0.astype(F32), xs)
    return jnp.moveaxis(outs, 0, 1), state


# (T, block, dtype, decay, causal, initial_state): lengths around the block edges, block sizes 16..256.
CASES = [
    (1, 64, F32, True, True, True),
    (63, 16, BF16, True, True, True),
    (64, 64, F32, False, True, False),
    (65, 32, F32, True, True, True),
    (65, 256, BF16, False, True, True),
    (63, 16, F32, True, False, False),
    (64, 128, BF16, True, False, False),
    (65, 64, F32, False, False, False),
    (1000, 64, F32, True, True, True),
    (1000, 256, BF16, False, True, False),
]


@pytest.mark.parametrize("t,block,dtype,decay,causal,init", CASES)
def test_chunked_matches_naive(t, block, dtype, decay, causal, init):
    b = 1 if t >= 1000 else 2
    inputs = _inputs(t + block, b, t, 2, 5, 6, dtype)
    kw = dict(decay=decay, is_causal=causal, init=init)
    xla, ref = _fn("xla", block=block, **kw), _fn("reference", **kw)
    names = ["query", "key", "value", "initial_state"]
    if init:
        assert_matches_reference(xla, ref, inputs, dtype=dtype, names=names)
    else:  # keep s0 out of the differentiated inputs
        s0 = inputs[3]
        assert_matches_reference(lambda q, k, v: xla(q, k, v, s0), lambda q, k, v: ref(q, k, v, s0), inputs[:3],
                                 dtype=dtype, names=names[:3])
    low = [x.astype(dtype) for x in inputs]
    result = xla(*low)
    out, state = result if causal else (result, None)
    assert out.dtype == dtype and out.shape == (b, t, 2, 6)
    if causal:
        assert state.dtype == F32 and state.shape == (b, 2, 5, 6)


@pytest.mark.parametrize("dtype,decay", [(F32, True), (BF16, False)])
def test_recurrence_matches_chunked(dtype, decay):
    """Step-by-step decoding from an initial state == one chunked call, outputs, final state and gradients."""
    inputs = _inputs(1, 2, 37, 2, 5, 6, dtype)
    slopes = jaxattn.lightning_slopes(2) if decay else None
    assert_matches_reference(_fn("xla", decay=decay, is_causal=True, init=True, block=16),
                             jax.jit(functools.partial(_recurrent, slopes=slopes)),
                             [inputs[0], inputs[1], inputs[2], inputs[3]], dtype=dtype)


def test_split_in_two_and_carry_state():
    """Two calls chained through the state == one call (split off a block edge): outputs, final state, gradients
    in fp32; outputs in bf16."""
    slopes = jaxattn.lightning_slopes(2)
    split = 37

    def chained(q, k, v, s0):
        first = dict(slopes=slopes, block_size=16, return_state=True, implementation="xla")
        o1, s1 = jaxattn.lightning_attention(q[:, :split], k[:, :split], v[:, :split], initial_state=s0, **first)
        o2, s2 = jaxattn.lightning_attention(q[:, split:], k[:, split:], v[:, split:], initial_state=s1, **first)
        return jnp.concatenate([o1, o2], axis=1), s2

    one_call = _fn("reference", decay=True, is_causal=True, init=True)
    chained = jax.jit(chained)
    inputs = _inputs(2, 2, 100, 2, 5, 6)
    assert_matches_reference(chained, one_call, inputs)
    assert_matches_reference(chained, one_call, inputs, dtype=BF16, grads=False)


def test_prefill_then_decode():
    """What a language model does: chunked prefill, then decoding steps, == one call over the whole sequence."""
    q, k, v, _ = _inputs(3, 2, 45, 2, 5, 6)
    slopes = jaxattn.lightning_slopes(2, layer_idx=1, num_layers=4)
    prefill = jax.jit(functools.partial(jaxattn.lightning_attention, slopes=slopes, return_state=True))
    step = jax.jit(functools.partial(jaxattn.lightning_attention_step, slopes=slopes))
    out, state = prefill(q[:, :40], k[:, :40], v[:, :40])
    outs = [out]
    for i in range(40, 45):
        o, state = step(q[:, i], k[:, i], v[:, i], state)
        outs.append(o[:, None])
    full, full_state = jaxattn.lightning_attention(q, k, v, slopes=slopes, return_state=True,
                                                   implementation="reference")
    assert_allclose(jnp.concatenate(outs, axis=1), full)
    assert_allclose(state, full_state)


def test_check_grads_reference():
    q, k, v, s0 = _inputs(4, 1, 9, 2, 3, 4, scale=0.5)
    slopes = jaxattn.lightning_slopes(2)
    for causal in (True, False):
        def ref(q, k, v, s0, causal=causal):
            init = s0 if causal else None
            return jaxattn.lightning_attention(q, k, v, slopes=slopes, is_causal=causal, initial_state=init,
                                               implementation="reference")
        check_grads(jax.jit(ref), (q, k, v, s0), order=1, modes=("fwd", "rev"), eps=1e-2)


def test_second_order_reverse_mode():
    """The custom_vjp's backward is plain JAX, so grad-of-grad works and matches the reference."""
    inputs = _inputs(5, 1, 11, 2, 3, 4, scale=0.5)
    slopes = jaxattn.lightning_slopes(2)

    def grad_vjp(implementation):
        def loss(*args):
            out, state = jaxattn.lightning_attention(*args[:3], slopes=slopes, block_size=4, initial_state=args[3],
                                                     return_state=True, implementation=implementation)
            return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.sin(state))
        grad = jax.grad(loss, argnums=(0, 1, 2, 3))
        return jax.jit(lambda *args: jax.vjp(grad, *args)[1](tuple(x[::-1] for x in args)))

    for got, want in zip(grad_vjp("xla")(*inputs), grad_vjp("reference")(*inputs)):
        assert_allclose(got, want, kind="grad")


@settings(max_examples=6)
@given(b=st.integers(1, 2), t=st.integers(1, 80), n=st.integers(1, 3), h=st.integers(1, 9), hv=st.integers(1, 9),
       block=st.sampled_from([1, 3, 16, 17, 64, 256]), causal=st.booleans(), decay=st.booleans())
def test_hypothesis_shapes(b, t, n, h, hv, block, causal, decay):
    q, k, v, s0 = _inputs(t, b, t, n, h, hv)
    kw = dict(slopes=jaxattn.lightning_slopes(n) if decay else None, is_causal=causal, return_state=causal,
              initial_state=s0 if causal else None)
    got = jax.jit(functools.partial(jaxattn.lightning_attention, block_size=block, implementation="xla", **kw))(
        q, k, v)
    want = jax.jit(functools.partial(jaxattn.lightning_attention, implementation="reference", **kw))(q, k, v)
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_allclose(a, r)


def test_empty_sequence_and_default_implementation():
    q, k, v, s0 = _inputs(5, 2, 0, 2, 3, 4)
    out, state = jaxattn.lightning_attention(q, k, v, initial_state=s0, return_state=True)
    assert out.shape == (2, 0, 2, 4) and state.dtype == F32
    np.testing.assert_array_equal(state, s0)
    from jaxattn.lightning.xla import lightning_chunked
    assert dispatch.resolve(api.OP, None, query=q, key=k, value=v, is_causal=True) is lightning_chunked


def test_memory_is_linear_in_length():
    """Compiled fwd+bwd temporaries at T = 32k: chunked is >= 20x below the naive T x T form (compile only)."""
    spec = jax.ShapeDtypeStruct((1, 32768, 1, 64), F32)
    slopes = jaxattn.lightning_slopes(1)

    def temp_bytes(implementation):
        def loss(q, k, v):
            return jnp.sum(jaxattn.lightning_attention(q, k, v, slopes=slopes, implementation=implementation))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

    chunked, naive = temp_bytes("xla"), temp_bytes("reference")
    assert chunked * 20 <= naive, (chunked, naive)


# ALiBi / TransNormerLLM slopes written out by hand: 8 heads -> 2^-1 .. 2^-8; 12 heads -> those 8, then every
# other slope of 16 heads (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5).
SLOPES_8 = [2.0 ** -i for i in range(1, 9)]
SLOPES_12 = SLOPES_8 + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]


def test_slopes_published_formula():
    np.testing.assert_allclose(jaxattn.lightning_slopes(8), SLOPES_8, rtol=1e-7)
    np.testing.assert_allclose(jaxattn.lightning_slopes(12), SLOPES_12, rtol=1e-7)
    np.testing.assert_allclose(jaxattn.lightning_slopes(3), [2.0 ** -4, 2.0 ** -8, 2.0 ** -2], rtol=1e-7)
    # layer l of L scales by 1 - l / (L - 1) + 1e-5
    np.testing.assert_allclose(jaxattn.lightning_slopes(8, 0, 24), np.array(SLOPES_8) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(jaxattn.lightning_slopes(8, 23, 24), np.array(SLOPES_8) * 1e-5, rtol=1e-5)
    np.testing.assert_allclose(jaxattn.lightning_slopes(12, 12, 25), np.array(SLOPES_12) * (0.5 + 1e-5),
                               rtol=1e-6)
    np.testing.assert_allclose(jaxattn.lightning_slopes(8, 0, 1), np.array(SLOPES_8) * (1 + 1e-5), rtol=1e-6)
    assert jaxattn.lightning_slopes(12).dtype == F32


def _bad_calls():
    q, k, v, s0 = _inputs(6, 2, 8, 2, 3, 4)
    la, step = jaxattn.lightning_attention, jaxattn.lightning_attention_step
    return [
        (lambda: la(q[0], k, v), "`query` must have rank 4"),
        (lambda: la(q, k[..., :2], v), "`key` head_dim"),
        (lambda: la(q, k, v[:, :5]), "`value` length"),
        (lambda: la(q, k[:, :, :1], v), "`key` num_heads"),
        (lambda: la(q, k, v[:1]), "`value` batch size"),
        (lambda: la(q, k, v.astype(BF16)), "one dtype"),
        (lambda: la(q.astype(jnp.int32), k, v), "`query` must be a floating"),
        (lambda: la(q, k, v, slopes=jnp.ones(3)), r"`slopes` must have shape \[num_heads\] = \(2,\)"),
        (lambda: la(q, k, v, slopes=-jnp.ones(2)), "`slopes` must be >= 0"),
        (lambda: la(q, k, v, initial_state=s0[..., :3]), r"`initial_state` must have shape"),
        (lambda: la(q, k, v, block_size=0), "`block_size` must be a positive int"),
        (lambda: la(q, k, v, block_size=16.0), "`block_size` must be a positive int"),
        (lambda: la(q, k, v, block_size=True), "`block_size` must be a positive int"),
        (lambda: la(q, k, v, is_causal=False, initial_state=s0), "`initial_state` needs is_causal=True"),
        (lambda: la(q, k, v, is_causal=False, return_state=True), "`return_state=True` needs is_causal=True"),
        (lambda: la(q, k, v, implementation="cuda"), "`implementation`"),
        (lambda: step(q[:, 0], k[:, 0], v[:, 0], s0[:, :1]), "`state` must have shape"),
        (lambda: step(q, k, v, s0), "`query` must have rank 3"),
        (lambda: jaxattn.lightning_slopes(0), "`num_heads` must be a positive int"),
        (lambda: jaxattn.lightning_slopes(8, layer_idx=3), "give both `layer_idx` and `num_layers`"),
        (lambda: jaxattn.lightning_slopes(8, 4, 4), r"`layer_idx` must be an int in \[0, num_layers=4\)"),
    ]


@pytest.mark.parametrize("index", range(21))
def test_bad_inputs_raise_value_error(index):
    call, match = _bad_calls()[index]
    with pytest.raises(ValueError, match=match):
        call()
