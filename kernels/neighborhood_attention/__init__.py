"""Fused neighborhood attention (NA, DiNA, causal, GNA, rpb) as Pallas kernels behind
`neighborhood_attention(implementation='pallas')`.

- `pallas.py`: `neighborhood_attention(...)` / `attention(...)` and the custom VJP; `pallas_fwd.py`,
  `pallas_bwd.py` hold the kernels, `tile.py` the per-tile math (windows, bias), `geometry.py` the dilation
  groups, boxes, window tables and halo walks, `blocks.py` the box sizes per target.
"""
