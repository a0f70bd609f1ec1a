"""Halo attention's dense per-tile path (`jaxattn.halo.dense_tiles`, relative logits inside the logits) against
the tiled bias + blocked `dot_product_attention` path: values and gradients of q, k, v and both tables."""

import jax
import pytest

from jaxattn.halo import dense_tiles, xla
from jaxattn.testing import assert_matches_reference, random_inputs


def _halo(dense: bool, block, halo, stride, mask, tables):
    def run(q, k, v, rh, rw):
        saved = xla.use_dense_tiles
        xla.use_dense_tiles = lambda num_keys: dense  # read while tracing
        try:
            return xla.halo_attention_xla(q, k, v, rh if tables else None, rw if tables else None,
                                          block_size=block, halo_size=halo, query_stride=stride,
                                          scale=q.shape[-1] ** -0.5, mask_padding=mask)
        finally:
            xla.use_dense_tiles = saved
    return run


CASES = {  # (batch, H, W, heads, D, Dv, block, halo, query_stride, mask_padding, tables)
    "h1_like": (1, 16, 16, 2, 4, 4, 8, 3, 1, False, True),
    "stride2_masked": (2, 8, 12, 1, 3, 5, 4, 1, 2, True, True),
    "no_tables": (1, 6, 9, 2, 3, 3, 3, 2, 1, False, False),
    "halo0_block1": (1, 3, 2, 1, 2, 2, 1, 0, 1, True, True),
}


@pytest.mark.parametrize("name,dtype,chunk_bytes",
                         [(c, "float32", None) for c in CASES] + [("h1_like", "bfloat16", None),
                                                                  ("h1_like", "float32", 1),  # one tile a chunk
                                                                  ("stride2_masked", "float32", 2000)])
def test_dense_tiles_match_blocked(name, dtype, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(dense_tiles, "CHUNK_BYTES", chunk_bytes)
    b, h, w, n, d, dv, block, halo, stride, mask, tables = CASES[name]
    win = block + 2 * halo
    shapes = [(b, h // stride, w // stride, n, d), (b, h, w, n, d), (b, h, w, n, dv), (2 * win - 1, d),
              (2 * win - 1, d)]
    inputs = random_inputs(0, shapes)
    args = (block, halo, stride, mask, tables)
    assert_matches_reference(_halo(True, *args), _halo(False, *args), inputs, dtype=getattr(jax.numpy, dtype),
                             names=["query", "key", "value", "rel_height", "rel_width"])


def test_dense_path_is_cpu_only_and_small_windows():
    on_cpu = jax.default_backend() == "cpu"
    assert dense_tiles.use_dense_tiles(14 * 14) == on_cpu
    assert not dense_tiles.use_dense_tiles(dense_tiles.DENSE_MAX_KEYS + 1)
