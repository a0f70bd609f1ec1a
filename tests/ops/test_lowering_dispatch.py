"""Dispatch at lowering time (issue 15): one trace of a public op, forward and backward, lowered from this CPU host
for tpu / cuda / cpu contains the Mosaic kernel / the GPU kernel / no kernel; an explicit implementation that cannot
run on the lowering platform fails that lowering by name; `jaxattn.explain` reports the choice."""
import jax
import jax.numpy as jnp
import pytest

import jaxattn

MOSAIC, GPU_KERNEL = "tpu_custom_call", "__gpu$xla.gpu.triton"


def _grad(f, *args):
    return jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=tuple(range(len(args)))))


CASES = {
    "dot_product": (lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True),
                    ((1, 256, 4, 64), (1, 256, 2, 64), (1, 256, 2, 64))),
    "neighborhood": (lambda q, k, v: jaxattn.na2d(q, k, v, 7), ((1, 16, 16, 2, 32),) * 3),
    "lightning": (lambda q, k, v: jaxattn.lightning_attention(q, k, v), ((1, 256, 2, 64),) * 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_trace_gets_each_platforms_kernel(name):
    f, shapes = CASES[name]
    args = [jnp.zeros(s, jnp.bfloat16) for s in shapes]
    traced = _grad(f, *args).trace(*args)
    for platform, present, absent in (("tpu", MOSAIC, GPU_KERNEL), ("cuda", GPU_KERNEL, MOSAIC), ("cpu", None, None)):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        if present is None:
            assert MOSAIC not in text and GPU_KERNEL not in text
        else:
            assert text.count(present) >= 2, (platform, text.count(present))  # forward and backward kernels
            assert absent not in text
    lines = jaxattn.explain(f, *args).splitlines()
    assert any(" on tpu: pallas (target 'tpu')" in line for line in lines)
    assert any(" on cpu: xla" in line for line in lines)


def test_explicit_backend_that_cannot_run_there_fails_that_lowering():
    from jaxattn.core import dispatch
    dispatch.register("test_only_op", dispatch.Backend("plain", lambda: jnp.sin))
    dispatch.register("test_only_op", dispatch.Backend("tpu_only", lambda: jnp.cos, platforms=("tpu",), priority=1,
                                                       runs_on=("tpu",)))
    x = jnp.zeros((4,))
    traced = jax.jit(lambda x: dispatch.call("test_only_op", "tpu_only", lambda f: f(x))).trace(x)
    assert "cosine" in traced.lower(lowering_platforms=("tpu",)).as_text()
    with pytest.raises(ValueError, match="implementation='tpu_only' of test_only_op cannot run on cpu"):
        traced.lower(lowering_platforms=("cpu",))
    default = jax.jit(lambda x: dispatch.call("test_only_op", None, lambda f: f(x))).trace(x)
    assert "sine" in default.lower(lowering_platforms=("cpu",)).as_text()
    q = jnp.zeros((1, 64, 2, 32))
    if not dispatch.module_available("jax_triton"):
        with pytest.raises(ValueError, match="does not support these arguments: Needs jax-triton"):
            jaxattn.dot_product_attention(q, q, q, implementation="triton")
    with pytest.raises(ValueError, match="must be one of"):
        jaxattn.dot_product_attention(q, q, q, implementation="cudnn")
