"""The shared test harness itself: comparison tolerances, lowering checks and forced host devices."""
import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from jaxattn import testing


def test_assert_allclose_scales_with_reference_magnitude():
    ref = jnp.array([1000.0, -2.0])
    testing.assert_allclose(ref + 0.01, ref)  # 1e-5 of 1000
    with pytest.raises(AssertionError, match="max error"):
        testing.assert_allclose(ref + 1.0, ref)


def test_assert_allclose_rejects_nan_and_shape_mismatch():
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_allclose(jnp.array([jnp.nan]), jnp.array([0.0]))
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_allclose(jnp.zeros(3), jnp.zeros(4))


def test_assert_matches_reference_catches_wrong_gradient():
    @jax.custom_vjp
    def bad_square(x):
        return x * x

    bad_square.defvjp(lambda x: (x * x, x), lambda x, g: (g * x,))  # missing factor 2
    (x,) = testing.random_inputs(0, [(5,)])
    testing.assert_matches_reference(lambda x: x * x, lambda x: x ** 2, [x])
    with pytest.raises(AssertionError, match="d/d"):
        testing.assert_matches_reference(bad_square, lambda x: x ** 2, [x])


def _double_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2


def _double(x, **kw):
    return pl.pallas_call(_double_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), **kw)(x)


def test_lowering_helper_sees_tpu_and_gpu_custom_calls():
    spec = jax.ShapeDtypeStruct((8, 128), jnp.float32)
    testing.assert_lowers(_double, spec, targets=("tpu", "mosaic_gpu"))
    from jax.experimental.pallas import triton as pl_triton
    triton_double = lambda x: _double(x, compiler_params=pl_triton.CompilerParams(num_warps=4))  # noqa: E731
    testing.assert_lowers(triton_double, spec, targets=("triton",))
    with pytest.raises(AssertionError, match="custom call"):
        testing.assert_lowers(lambda x: x * 2, spec, targets=("tpu",))


def test_run_with_devices_subprocess():
    out = testing.run_with_devices(4, "import jax; print(jax.device_count())")
    assert out.strip() == "4"
    assert jax.device_count() == 1


@pytest.mark.devices(8)
def test_devices_marker_runs_in_child_with_eight_devices():
    assert jax.device_count() == 8
