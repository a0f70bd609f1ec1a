"""Triton flash attention with issue 16's features (sinks, soft-cap, per-head windows, kv_lengths, block masks):
cubin for sm_90 with every feature on, and the JAX launcher run by the Triton interpreter (in a child process)
against the dense formula of `flash_features_dense.py`, forward and gradients (sinks included)."""
import os

import pytest

from jaxattn.kernels.common import verify

_MISSING = verify.triton_available()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

KERNELS = ("flash_fwd", "flash_bwd_dkv", "flash_bwd_dq")


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_to_cubin_with_every_feature(kernel, monkeypatch):
    """Sinks, soft cap, per-head windows, key lengths and a per-head block mask (the walk table), causal GQA,
    a full fp32 bias and its gradient, at T = S = 8192, H = 128, bf16, for sm_90."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from jaxattn.kernels.flash_attention import triton_kernels, triton_launch
    from jaxattn.kernels.flash_attention.tile import Problem
    t = 8192
    problem = Problem.of(t, t, 128, is_causal=True, window=[(1024, 0), None] * 4, logits_soft_cap=50.0,
                         kv_lengths=True, block_shape=(128, 128), num_heads=8)
    launch = triton_launch.plan(kernel, q_shape=(1, t, 8, 128), k_shape=(1, t, 2, 128), v_shape=(1, t, 2, 128),
                                bias_shape=(1, 8, t, t), band=problem.band, scale=128 ** -0.5, fp32=False,
                                store_ds=True, problem=problem, sinks=True, block_mask_shape=(1, 8, 64, 64))
    assert launch.constexprs["HAS_WALK"] and launch.walk.heads == 8
    compiled = verify.triton_compile(getattr(triton_kernels, kernel),
                                     triton_launch.signature(kernel, "bf16", bias_dtype="fp32"), launch.constexprs,
                                     90, num_warps=launch.num_warps, num_stages=launch.num_stages)
    assert len(compiled.asm["cubin"]) > 0 and ".target sm_90" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= 227 * 1024


_CHILD = r"""
import functools, sys
sys.path.insert(0, "tests/kernels")
import jax, jax.numpy as jnp
from jaxattn.kernels.common.verify import install_interpreted_jax_triton
install_interpreted_jax_triton()
from flash_features_dense import feature_case
from jaxattn.kernels.flash_attention import triton as flash_triton
from jaxattn.testing import assert_matches_reference

B, T, S, N, K, H = 2, 37, 70, 2, 1, 16  # odd lengths, T != S, GQA

def check(name, dtype=jnp.float32, blocks=None, **opts):
    kernel = functools.partial(flash_triton.flash_attention, blocks=blocks)
    impl, ref, inputs = feature_case(kernel, opts, [(B, T, N, H), (B, S, K, H), (B, S, K, H)], seed=1)
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=["query", "key", "value", "sinks"])
    print("ok", name, flush=True)

small = {k: (16, 16, 4, 2) for k in ("flash_fwd", "flash_bwd_dkv", "flash_bwd_dq")}  # several blocks per axis
block_mask = jax.random.bernoulli(jax.random.key(3), 0.5, (1, N, 3, 5))
everything = dict(sinks=True, logits_soft_cap=3.0, window=[(8, 3), None], kv_lengths=(20, 61),
                  is_causal=True, block_mask=block_mask, block_shape=(16, 16))
check("sinks_cap_causal_band", sinks=True, logits_soft_cap=2.0, is_causal=True)
check("everything_walk", blocks=small, **everything)
check("everything_walk_bf16", dtype=jnp.bfloat16, **everything)
"""


def test_interpreter_matches_dense():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = verify.run_triton_interpreted(_CHILD, cwd=root, timeout=900)
    assert out.count("ok ") == 3, out
