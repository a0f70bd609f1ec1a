"""Real Mosaic compiles (libtpu, deviceless) of the flash and lightning kernels with the block sizes planned for
TPU v5e and v6e, at the models' largest head dim (128: the LMs), forward and backward in one program per
generation (one compile each): the kernel calls are in the compiled program, the blocks follow the generation of
the mesh in context, and XLA's cost analysis includes the kernels' estimates. v4 and v5p compile in
`benchmarks/kernels.py --tpu-compile`."""
import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # test workers compiling side by side each load libtpu
pytest.importorskip("libtpu")

import jax  # noqa: E402

from jaxattn.kernels.common import tpu  # noqa: E402
from jaxattn.kernels.flash_attention import blocks as flash_blocks  # noqa: E402
from jaxattn.kernels.lightning_attention import blocks as scan_blocks  # noqa: E402
from jaxattn.testing.tpu_compile import KERNEL_CALLS, compile_kernels, single_device_mesh  # noqa: E402

@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_planned_blocks_compile_for_tpu(generation):
    mesh = single_device_mesh(generation)
    with jax.set_mesh(mesh):
        assert tpu.current_generation() == generation
        assert flash_blocks.fit("tpu", 8192, 8192, head_dim=128) == flash_blocks.TPU_PLANS[generation]
        assert scan_blocks.fit("tpu", 8192, head_dim=128) == scan_blocks.TPU_PLANS[generation]
    result = compile_kernels(mesh, quick=True)
    assert result.kernel_calls == KERNEL_CALLS and result.missing == ()
    assert result.xla_flops >= result.estimated_flops > 0
