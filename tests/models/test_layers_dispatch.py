"""The CPU fast paths of `models.layers` (shifted depthwise conv, matmul-form conv kernel gradient) are chosen at
lowering time: one program traced here gets them when lowered for CPU and XLA's convolutions when lowered for TPU."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxattn.models.layers.conv as conv_mod
from jaxattn.core import dispatch
from jaxattn.models.layers import DepthwiseConv2d
from jaxattn.models.layers.depthwise_vjp import DepthwiseConv2dVJP

NHWC = ("NHWC", "HWIO", "NHWC")


def _lowered_ops(fn, *args, op="stablehlo.convolution"):
    traced = jax.jit(fn).trace(*args)
    return {p: traced.lower(lowering_platforms=(p,)).as_text().count(op) for p in ("cpu", "tpu")}


@pytest.mark.parametrize("layer_class", [DepthwiseConv2d, DepthwiseConv2dVJP])
def test_depthwise_layer_is_shifted_on_cpu_and_grouped_conv_on_tpu(layer_class):
    graph, state = nnx.split(layer_class(4, 3, stride=2, rngs=nnx.Rngs(0)))
    x = jnp.ones((1, 6, 6, 4))

    def loss(state, x):
        return jnp.sin(nnx.merge(graph, state)(x)).sum()

    assert _lowered_ops(loss, state, x) == {"cpu": 0, "tpu": 1}
    # forward, input and kernel gradients: all grouped convolutions on TPU, none on CPU
    assert _lowered_ops(jax.grad(loss, argnums=(0, 1)), state, x) == {"cpu": 0, "tpu": 3}
    op = "depthwise_conv2d" if layer_class is DepthwiseConv2d else "depthwise_conv2d_vjp"
    assert dispatch.explain(loss, state, x, platforms=("cpu", "tpu")).splitlines() == [
        f"{op} on cpu: shifted", f"{op} on tpu: lax"]


def test_explicit_depthwise_implementation_is_kept_on_every_platform():
    graph, state = nnx.split(DepthwiseConv2d(4, 3, implementation="shifted", rngs=nnx.Rngs(0)))
    assert _lowered_ops(lambda s, x: nnx.merge(graph, s)(x), state, jnp.ones((1, 5, 5, 4))) == {"cpu": 0, "tpu": 0}


def test_conv_matmul_grad_only_on_cpu(monkeypatch):
    monkeypatch.setattr(conv_mod, "MIN_OUT_PIXELS", 1)
    monkeypatch.setattr(conv_mod, "MIN_CHANNEL_PRODUCT", 1)
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))

    def loss(x, w):
        return jnp.sin(conv_mod.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)).sum()

    grad = jax.grad(loss, argnums=(0, 1))
    # CPU: the kernel gradient is kh = 3 matmuls, forward and input gradient stay convolutions
    assert _lowered_ops(grad, x, w, op="stablehlo.dot_general") == {"cpu": 3, "tpu": 0}
    assert _lowered_ops(grad, x, w) == {"cpu": 2, "tpu": 3}
    assert dispatch.explain(loss, x, w, platforms=("cpu", "tpu")).splitlines() == [
        "conv2d_weight_grad on cpu: matmul_grad", "conv2d_weight_grad on tpu: lax"]


def test_conv_matmul_grad_refuses_small_convs_by_name():
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
    lines = dispatch.explain(
        lambda x, w: conv_mod.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC), x, w,
        platforms=("cpu",))
    assert lines.startswith("conv2d_weight_grad on cpu: lax  [skipped matmul_grad: Needs")
    with pytest.raises(ValueError, match="implementation='matmul_grad' of conv2d_weight_grad does not support"):
        conv_mod.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, implementation="matmul_grad")
