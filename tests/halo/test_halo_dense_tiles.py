"""Halo attention's dense per-tile path (`jaxattn.halo.dense_tiles`, relative logits inside the logits) against
the tiled bias + blocked `dot_product_attention` path: values and gradients of q, k, v and both tables."""

import jax
import pytest

import jaxattn
from jaxattn.halo import dense_tiles
from jaxattn.testing import assert_matches_reference, random_inputs


def _halo(dense: bool, block, halo, stride, mask, tables):
    def run(q, k, v, rh, rw):
        return jaxattn.halo_attention(q, k, v, block, halo, rel_height=rh if tables else None,
                                      rel_width=rw if tables else None, query_stride=stride, mask_padding=mask,
                                      implementation="small_windows" if dense else "xla")
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


def test_small_windows_is_chosen_for_cpu_only():
    from jaxattn.core import dispatch
    from jaxattn.halo import api
    small = {p: c.backend for p, c in dispatch.plan(api.OP, None, num_keys=14 * 14).items()}
    assert small == {"cpu": "small_windows", "cuda": "xla", "rocm": "xla", "tpu": "xla"}
    big = dispatch.plan(api.OP, None, num_keys=dense_tiles.DENSE_MAX_KEYS + 1)
    assert {c.backend for c in big.values()} == {"xla"}
