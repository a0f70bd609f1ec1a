"""Triton lightning attention: cubin for sm_80 and sm_90 at T = 8192, H = 128 (no register spills on sm_90 in
bf16), launch plans, and the whole JAX launcher (custom VJP, launch plans, heads-last strides) run end to end by the
Triton interpreter (`TRITON_INTERPRET=1`, in a child process) against the reference, forward and backward. Skips
cleanly without triton or torch."""
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from jaxattn.kernels.common import verify

_MISSING = verify.triton_available()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def _spilled_bytes(cubin: bytes) -> int | None:
    """Stack bytes per thread (register spills) from `cuobjdump -res-usage`, None when cuobjdump is missing."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"STACK:(\d+)", out)
    return None if found is None else int(found.group(1))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("reverse,documents", [(False, False), (True, False), (False, True)],
                         ids=["forward_scan", "reverse_scan", "forward_scan_documents"])
def test_compiles_to_cubin(arch, reverse, documents, monkeypatch):
    """The forward scan (outputs, dq) and the reverse scan (dk, dv) with decay, an initial state and the final
    state, bf16, T = 8192, 16 heads of 128 (and the forward scan over packed documents)."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from jaxattn.kernels.lightning_attention import triton_kernels, triton_launch
    launch = triton_launch.plan(batch=1, length=8192, heads=16, dim_a=128, dim_c=128, reverse=reverse, decay=True,
                                init=True, want_state=True, fp32=False, documents=documents)
    compiled = verify.triton_compile(triton_kernels.lightning_scan, triton_launch.signature("bf16"),
                                     launch.constexprs, arch, num_warps=launch.num_warps,
                                     num_stages=launch.num_stages)
    assert len(compiled.asm["cubin"]) > 0
    assert f".target sm_{arch}" in compiled.asm["ptx"]
    assert ("wgmma" if arch == 90 else "mma.sync") in compiled.asm["ptx"]  # tensor cores
    assert compiled.metadata.shared <= (227 if arch == 90 else 163) * 1024
    spilled = _spilled_bytes(compiled.asm["cubin"])
    if arch == 90 and spilled is not None:  # the document masks cost a few registers (16 bytes spilled)
        assert spilled <= (32 if documents else 0), f"{spilled} bytes of register spills per thread"


def test_launch_plans():
    from jaxattn.kernels.lightning_attention import triton_launch
    kw = dict(batch=2, length=37, heads=3, reverse=True, decay=False, init=False, want_state=False)
    plan = triton_launch.plan(dim_a=24, dim_c=80, fp32=False, **kw)
    assert plan.grid == (3, 6)  # ceil(80 / 32) column tiles x batch * heads
    consts = plan.constexprs
    assert consts["BLOCK"] == 64 and consts["BLOCK_C"] == 32 and consts["DAP"] == 32
    assert consts["PRECISION"] == "tf32" and consts["REVERSE"] and not consts["HAS_DECAY"]
    fp32 = triton_launch.plan(dim_a=24, dim_c=80, fp32=True, **kw)
    assert fp32.constexprs["PRECISION"] == "ieee" and fp32.grid == (5, 6)  # 16-column tiles
    wide = triton_launch.plan(dim_a=192, dim_c=96, fp32=False, **kw)
    assert wide.constexprs["BLOCK"] == 32 and wide.constexprs["DAP"] == 256
    small = triton_launch.plan(batch=1, length=5, heads=1, dim_a=8, dim_c=8, reverse=False, decay=True,
                               init=True, want_state=True, fp32=False)
    assert small.constexprs["BLOCK"] == 16 and small.constexprs["BLOCK_C"] == 16 and small.grid == (1, 1)


# Runs in a child with TRITON_INTERPRET=1: `jax_triton.triton_call` is replaced by the interpreter, so the
# launcher in kernels/lightning_attention/triton.py runs unchanged on torch CPU tensors.
_CHILD = r"""
import jax, jax.numpy as jnp
from jaxattn.kernels.common.verify import install_interpreted_jax_triton
install_interpreted_jax_triton()
import jaxattn
from jaxattn.kernels.lightning_attention import triton as lightning_triton
from jaxattn.lightning.reference import lightning_reference
from jaxattn.testing import assert_matches_reference, random_inputs

def check(name, b, t, n, h, hv, *, slopes, causal=True, init=True, dtype=jnp.float32, blocks=(16, 16, 4, 2),
          segment_ids=None):
    init = init and causal
    shapes = [(b, t, n, h), (b, t, n, h), (b, t, n, hv)] + ([(b, n, h, hv)] if init else [])
    def impl(q, k, v, *s0):
        out, state = lightning_triton.lightning_attention(q, k, v, slopes, initial_state=s0[0] if s0 else None,
                                                          is_causal=causal, blocks=blocks,
                                                          segment_ids=segment_ids)
        return (out, state) if causal else out
    def ref(q, k, v, *s0):
        out, state = lightning_reference(q, k, v, slopes, s0[0] if s0 else None, is_causal=causal,
                                         segment_ids=segment_ids)
        return (out, state) if causal else out
    assert_matches_reference(impl, ref, random_inputs(1, shapes), dtype=dtype,
                             names=["query", "key", "value", "initial_state"])
    print("ok", name, flush=True)

# Odd lengths (masked tail rows), head dims that are not powers of two (masked feature columns), several
# column tiles, fast and no decay, both dtypes, both directions.
check("decay_init_odd_dims", 1, 37, 2, 24, 40, slopes=jnp.asarray([0.05, 3.0]))
check("no_decay_init_bf16", 1, 37, 2, 16, 16, slopes=None, dtype=jnp.bfloat16)
check("bidirectional_decay", 1, 33, 2, 16, 16, slopes=jaxattn.lightning_slopes(2), causal=False)
# Packed documents: starts inside a block, on a block edge (16), a one-token document; masked tail rows.
docs = jnp.asarray([[0] * 5 + [1] * 11 + [2] + [3] * 20], jnp.int32)
check("documents_decay_init", 1, 37, 2, 24, 40, slopes=jnp.asarray([0.05, 3.0]), segment_ids=docs)
"""


def test_interpreter_matches_reference():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = verify.run_triton_interpreted(_CHILD, cwd=root, timeout=900)
    assert out.count("ok ") == 4, out
