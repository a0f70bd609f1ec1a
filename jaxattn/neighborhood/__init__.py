"""Neighborhood attention (NA, dilated DiNA, causal, strided GNA) on 1-3 spatial axes, NATTEN semantics."""
from jaxattn.neighborhood.api import na1d, na2d, na3d, neighborhood_attention

__all__ = ["neighborhood_attention", "na1d", "na2d", "na3d"]
