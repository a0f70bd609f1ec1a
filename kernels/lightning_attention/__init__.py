"""Lightning attention (TransNormerLLM) kernels behind `lightning_attention(implementation='pallas'|'triton')`.

Every kernel is one primitive, a blocked *scan* (`o = causal_or_anticausal_lightning(a, b, c)` with a carried fp32
state), and the whole op (forward, backward, bidirectional) is a few scans:
- `vjp.py`: the custom VJP (dq, dk, dv, d initial_state) and the bidirectional form, written once over any scan;
- `pallas_scan.py` + `pallas.py`: the Pallas scan for TPU (Mosaic, blocks walked by the grid) and GPU
  (Pallas-Triton, blocks walked by an in-kernel loop), and the op-facing wrapper (layout, padding);
- `triton_kernels.py` + `triton_launch.py` + `triton.py`: the same scan as a real Triton kernel, launched through
  `jax_triton` (imported lazily); the launch plans are shared with the tests;
- `blocks.py`: block sizes per target.
"""
