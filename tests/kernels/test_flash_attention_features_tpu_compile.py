"""Real Mosaic compile (libtpu, deviceless, TPU v5e) of the Pallas flash-attention kernels with every issue-16
feature on (sinks, soft cap, per-head windows, kv_lengths, a per-head block mask: the scalar-prefetched walk
tables), forward and backward in one program; and their Pallas-Triton (GPU) lowering."""
import os

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # test workers compiling side by side each load libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxattn.kernels.common.verify import with_vjp  # noqa: E402
from jaxattn.kernels.flash_attention import pallas  # noqa: E402
from jaxattn.testing import assert_lowers  # noqa: E402

KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv")
B, T, N, K, H = 2, 2048, 8, 2, 128
BLOCK_SHAPE = (256, 256)


def _call(target):
    sds = jax.ShapeDtypeStruct
    args = [sds((B, T, N, H), jnp.bfloat16), sds((B, T, K, H), jnp.bfloat16), sds((B, T, K, H), jnp.bfloat16),
            sds((N,), jnp.float32), sds((B,), jnp.int32), sds((1, N, T // 256, T // 256), jnp.bool_)]
    cotangents = (sds((B, T, N, H), jnp.bfloat16), sds((B, N, T), jnp.float32))

    def fn(q, k, v, sinks, kv_lengths, block_mask):
        return pallas.flash_attention(q, k, v, sinks=sinks, logits_soft_cap=50.0, is_causal=True,
                                      window=[(512, 0), None] * (N // 2), kv_lengths=kv_lengths,
                                      block_mask=block_mask, block_shape=BLOCK_SHAPE, target=target)

    return with_vjp(fn, range(4)), args, cotangents


def test_every_feature_compiles_for_tpu_v5e():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
    fwd_bwd, args, cotangents = _call("tpu")
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.P())
        placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in (*args, *cotangents)]
        compiled = jax.jit(fwd_bwd).trace(*placed[:len(args)], tuple(placed[len(args):])).lower().compile()
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 3 and all(name in text for name in KERNELS)


def test_every_feature_lowers_for_pallas_triton():
    fwd_bwd, args, cotangents = _call("triton")
    text = assert_lowers(fwd_bwd, *args, cotangents, targets=("triton",))["triton"]
    assert text.count("__gpu$xla.gpu.triton") == 3
