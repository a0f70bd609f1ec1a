"""Fused neighborhood attention (NA, DiNA, causal, GNA, rpb) as Pallas kernels behind
`neighborhood_attention(implementation='pallas')`.

- `pallas.py`: `neighborhood_attention(...)` / `attention(...)` and the custom VJP; `pallas_fwd.py`,
  `pallas_bwd.py` hold the kernels (and their cost estimates), `tile.py` the per-tile math (windows, bias),
  `geometry.py` the dilation groups, query tiles and key boxes, window tables and the walks between tiles,
  `blocks.py` the tile sizes per target and TPU generation.
"""
