"""Shared model layers: the per-platform depthwise conv agrees across implementations; drop path; registry."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import models
from jaxattn.models import layers
from jaxattn.testing import assert_matches_reference, random_inputs


@pytest.mark.parametrize("kernel,stride,padding,dilation,size,dtype", [
    (3, 1, "SAME", 1, (9, 7), jnp.float32), (3, 2, "SAME", 1, (7, 9), jnp.float32),
    (5, 1, 2, 1, (6, 6), jnp.bfloat16), (3, 2, ((0, 1), (0, 1)), 1, (8, 8), jnp.float32),
    (3, 1, "VALID", 2, (9, 8), jnp.bfloat16),
])
def test_depthwise_shifted_equals_grouped_conv(kernel, stride, padding, dilation, size, dtype):
    x, w = random_inputs(0, [(2, *size, 6), (kernel, kernel, 1, 6)])

    def run(impl):
        return lambda x, w: layers.depthwise_conv2d(x, w, stride=stride, padding=padding, dilation=dilation,
                                                    implementation=impl)

    assert_matches_reference(run("shifted"), run("lax"), [x, w], dtype=dtype, names=["x", "kernel"])


def test_same_padding_matches_tensorflow_rule():
    assert layers.resolve_padding("SAME", 8, 3, 2, 1) == (0, 1)
    assert layers.resolve_padding("SAME", 7, 3, 2, 1) == (1, 1)
    assert layers.resolve_padding("SAME", 5, 3, 1, 1) == (1, 1)
    with pytest.raises(ValueError, match="padding"):
        layers.resolve_padding("FULL", 5, 3, 1, 1)


def test_depthwise_rejects_bad_kernel():
    with pytest.raises(ValueError, match="kernel"):
        layers.depthwise_conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 4)))


def test_drop_path_train_and_eval():
    module = layers.DropPath(0.5, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((64, 3, 3, 2))
    y = module(x)
    kept = np.asarray(y[:, 0, 0, 0])
    assert set(np.unique(kept)) <= {0.0, 2.0} and 0 < kept.sum() < 128
    assert np.all(np.asarray(y) == kept[:, None, None, None])  # whole samples dropped
    module.eval()
    assert np.array_equal(module(x), x)


def test_drop_path_rates_linear():
    rates = layers.drop_path_rates(0.3, [2, 2])
    np.testing.assert_allclose(sum(rates, []), [0.0, 0.1, 0.2, 0.3])


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        models.create_model("no_such_model")


def test_keep_freed_memory_in_a_child_process():
    """mallopt is process-wide, so it runs in a child (the module is loaded by path: no JAX import there)."""
    import pathlib
    import subprocess
    import sys
    path = pathlib.Path(__file__).resolve().parents[2] / "models" / "layers" / "malloc.py"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('malloc', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "ok = m.keep_freed_memory()\n"
            "assert ok is (sys.platform.startswith('linux') and hasattr(__import__('ctypes').CDLL(None), 'mallopt'))\n"
            "x = bytearray(200 << 20); del x\n"  # a large block still allocates and frees
            "print(ok)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
