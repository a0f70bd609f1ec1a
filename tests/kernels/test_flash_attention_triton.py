"""Triton flash attention: cubin for sm_80 and sm_90 at realistic shapes, and the whole JAX launcher (layouts,
custom VJP, launch plans) run end to end by the Triton interpreter (`TRITON_INTERPRET=1`, in a child process)
against the reference, forward and backward. Skips cleanly without triton or torch."""
import os

import pytest

from jaxattn.kernels.common import verify

_MISSING = verify.triton_available()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

KERNELS = ("flash_fwd", "flash_bwd_dkv", "flash_bwd_dq")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_to_cubin(arch, kernel, monkeypatch):
    """Every feature on (GQA, full fp32 bias and its gradient, segments, causal window) at T = S = 8192, H = 128."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from jaxattn.kernels.flash_attention import triton_kernels, triton_launch
    launch = triton_launch.plan(kernel, q_shape=(1, 8192, 8, 128), k_shape=(1, 8192, 2, 128),
                                v_shape=(1, 8192, 2, 128), bias_shape=(1, 8, 8192, 8192), segments=True,
                                band=(-1024, 0), scale=128 ** -0.5, fp32=False, store_ds=True)
    compiled = verify.triton_compile(getattr(triton_kernels, kernel),
                                     triton_launch.signature(kernel, "bf16", bias_dtype="fp32"), launch.constexprs,
                                     arch, num_warps=launch.num_warps, num_stages=launch.num_stages)
    assert len(compiled.asm["cubin"]) > 0
    assert f".target sm_{arch}" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= (227 if arch == 90 else 163) * 1024  # fits the SM's shared memory


def test_launch_plans():
    from jaxattn.kernels.flash_attention import triton_launch
    assert triton_launch.bias_strides((1, 8, 1, 50)) == (0, 50, 0, 1)
    plan = triton_launch.plan("flash_bwd_dkv", q_shape=(2, 37, 4, 80), k_shape=(2, 50, 2, 80),
                              v_shape=(2, 50, 2, 24), scale=0.1, fp32=True)
    assert plan.grid == (1, 4)  # one 64-key block, batch x kv heads
    assert plan.constexprs["DP"] == 128 and plan.constexprs["DVP"] == 32 and plan.constexprs["GROUPS"] == 2
    assert plan.constexprs["BLOCK_M"] == 64 and not plan.constexprs["HAS_LOWER"]


# Runs in a child with TRITON_INTERPRET=1: `jax_triton.triton_call` is replaced by the interpreter, so the
# launcher in kernels/flash_attention/triton.py runs unchanged on torch CPU tensors.
_CHILD = r"""
import jax, jax.numpy as jnp
from jaxattn.kernels.common.verify import install_interpreted_jax_triton
install_interpreted_jax_triton()
from jaxattn.dot_product import common, reference
from jaxattn.kernels.flash_attention import triton as flash_triton
from jaxattn.testing import assert_matches_reference, random_inputs

def segments(b, length):
    return (jnp.arange(length)[None] * 3 // length).repeat(b, 0).astype(jnp.int32)

def check(name, b, t, s, n, k, h, hv=None, *, bias=None, causal=False, window=None, seg=False, outputs="both",
          dtype=jnp.float32):
    shapes = [(b, t, n, h), (b, s, k, h), (b, s, k, hv or h)] + ([bias] if bias else [])
    inputs = random_inputs(1, shapes)
    qs, ks = (segments(b, t), segments(b, s)) if seg else (None, None)
    spec = common.MaskSpec(causal, window, s - t)
    pick = {"both": lambda r: r, "out": lambda r: r[0], "lse": lambda r: r[1]}[outputs]
    def impl(q, kk, v, *bb):
        return pick(flash_triton.flash_attention(q, kk, v, *bb, q_segment_ids=qs, k_segment_ids=ks,
                                                 is_causal=causal, window=window))
    @jax.jit
    def ref(q, kk, v, *bb):
        return pick(reference.attention_reference(q, kk, v, bb[0] if bb else None, None, qs, ks,
                                                  scale=h ** -0.5, spec=spec))
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=["query", "key", "value", "bias"])
    print("ok", name, flush=True)

# Lengths not multiples of the blocks (64/128), T != S, GQA, every mask and bias broadcast, both dtypes.
check("plain_gqa_odd_head", 1, 37, 70, 4, 2, 80)
check("causal_window_segments_bias_b11s", 2, 37, 70, 4, 2, 16, bias=(2, 1, 1, 70), causal=True, window=(9, 0),
      seg=True)
check("window_t_gt_s_empty_rows_bias_nts_bf16", 1, 70, 37, 2, 1, 16, bias=(2, 70, 37), window=(5, 3),
      dtype=jnp.bfloat16, outputs="out")
check("decode_t1_hv_ne_h_lse_only", 1, 1, 77, 4, 1, 16, 24, causal=True, outputs="lse")
"""


def test_interpreter_matches_reference():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = verify.run_triton_interpreted(_CHILD, cwd=root, timeout=900)
    assert out.count("ok ") == 4, out
