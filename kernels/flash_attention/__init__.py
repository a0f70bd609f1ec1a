"""Flash attention (FlashAttention-2) kernels behind `dot_product_attention(implementation='pallas'|'triton')`.

- `pallas.py`: `flash_attention(...)` / `attention(...)`, Pallas kernels for TPU (Mosaic) and GPU (Pallas-Triton)
  with a fused backward; `pallas_fwd.py`, `pallas_bwd.py` hold the kernels, `tile.py` the per-tile math and the
  band (block skipping) geometry, `blocks.py` the tile sizes per target.
- `triton.py`: the same kernels in Triton, called through `jax_triton` (imported lazily); `triton_kernels.py`
  holds the `@triton.jit` functions and `triton_launch.py` the launch plans shared with the Triton tests.
"""
