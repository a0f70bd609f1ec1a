"""Machinery shared by the kernels under `kernels/` (each kernel folder follows `kernels/flash_attention/`).

- `platform`: the kernel target ('tpu', 'triton', 'interpret') and its `pallas_call` compiler params;
- `blocks`: fitting tile sizes to lengths under each target's rules, padding;
- `tpu`: the TPU generations (v4, v5e, v5p, v6e: VMEM, default scoped limit, MXU, device kinds) and the one a
  program is lowered for;
- `cost`: the `pl.CostEstimate` arithmetic of the attention kernels (what XLA's cost analysis counts for them);
- `bands`: block skipping for banded (causal / windowed) masks;
- `loops`: one kernel body, reduction walked by an in-kernel loop ('fori') or by the grid ('grid');
- `verify`: what the tests need without hardware: functions whose lowering covers forward and backward, and the
  Triton harness (compile to cubin for sm_80/sm_90, run under `TRITON_INTERPRET=1` in a subprocess).
"""
