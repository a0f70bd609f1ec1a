"""The kernels' `pl.CostEstimate`s: a hand count of what each flash / lightning kernel computes (causal and
windowed skipping, GQA, padding), and the estimates in the lowered TPU module, where XLA's cost analysis reads them."""
import json
import re

import jax
import jax.numpy as jnp
import pytest

from jaxattn.kernels.flash_attention import pallas as flash
from jaxattn.kernels.flash_attention.blocks import BlockSizes as FlashBlocks
from jaxattn.kernels.lightning_attention import pallas as lightning
from jaxattn.kernels.lightning_attention.blocks import BlockSizes as ScanBlocks
from jaxattn.testing.lowering import jaxpr_equations, lowered_text, pallas_call_costs

def _flash_grad(q, k, v, **kw):
    def loss(q, k, v):
        return flash.flash_attention(q, k, v, target="tpu", block_sizes=FlashBlocks.uniform(128, 128), **kw)[0].sum()
    return jax.grad(loss, argnums=(0, 1, 2))


# (T, window, is_causal) -> visited 128 x 128 tiles per query head, counted by hand: 4 query blocks x 4 key blocks;
# causal: 1 + 2 + 3 + 4; window (128, 0): the diagonal block and the one before, except in the first row;
# T = 500 pads to 512 (the padded tiles are computed, the masked tail is not skipped).
@pytest.mark.parametrize("t, window, causal, pairs", [(512, None, False, 16), (512, None, True, 10),
                                                      (512, (128, 0), False, 7), (500, None, True, 10)])
def test_flash_estimates_count_visited_tiles(t, window, causal, pairs):
    b, n, kv, h = 2, 4, 2, 64  # GQA: every query head walks its own tiles of the shared key/value head
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
    costs = pallas_call_costs(_flash_grad(q, k, k, is_causal=causal, window=window), q, k, k)
    logits = b * n * pairs * 128 * 128
    tp = 512
    assert {name: (c.flops, c.transcendentals) for name, c in costs.items()} == {
        "flash_attention_fwd": (4 * h * logits, logits),
        "flash_attention_dq": (6 * h * logits, logits),
        "flash_attention_dkv": (8 * h * logits, logits)}
    tile_kv = 128 * 2 * h * 2  # one k and one v tile, bf16
    assert costs["flash_attention_fwd"].bytes_accessed == b * n * tp * (2 * h * 2 + 4) + b * n * pairs * tile_kv
    assert costs["flash_attention_dkv"].bytes_accessed == (b * kv * tp * 4 * h * 2
                                                          + b * n * pairs * 128 * (2 * h * 2 + 8))


def test_flash_bias_and_segment_bytes():
    """A bias tile is read and a dlogits tile written per visited pair; segment ids add 4 bytes per row read."""
    b, t, n, h = 1, 256, 2, 32
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    bias = jax.ShapeDtypeStruct((b, n, t, t), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, bias, seg):
        return flash.flash_attention(q, q, q, bias, q_segment_ids=seg, k_segment_ids=seg, target="tpu",
                                     block_sizes=FlashBlocks.uniform(128, 128))[0].sum()

    def costs(*argnums):
        return pallas_call_costs(jax.grad(loss, argnums=argnums), q, bias, seg)

    plain, with_dbias = costs(0), costs(0, 1)
    tile = 128 * 128 * 4
    pairs = b * n * 4
    assert with_dbias["flash_attention_dq"].bytes_accessed - plain["flash_attention_dq"].bytes_accessed == pairs * tile
    fwd = plain["flash_attention_fwd"].bytes_accessed
    assert fwd == b * n * t * (2 * h * 4 + 4 + 4) + pairs * (128 * 2 * h * 4 + tile + 128 * 4)


def _scan_costs(fn, *args):
    """`[(name, estimate)]` of every `pallas_call` (the scans share two names, so no dict)."""
    return [(e.params["name"], e.params["cost_estimate"]) for e in jaxpr_equations(fn, *args)
            if e.primitive.name == "pallas_call"]


@pytest.mark.parametrize("decay", [False, True])
def test_lightning_estimates_count_each_scan(decay):
    b, t, n, h, hv, block = 2, 200, 3, 32, 64, 64  # T = 200 pads to 4 blocks of 64
    steps, programs, tp = 4, b * n, 256
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((b, t, n, hv), jnp.bfloat16)
    slopes = jnp.linspace(0.1, 0.5, n) if decay else None

    def loss(q, k, v):
        out, state = lightning.lightning_attention(q, k, v, slopes, target="tpu", block_sizes=ScanBlocks(block))
        return out.sum() + state.sum()

    costs = _scan_costs(jax.grad(loss, argnums=(0, 1, 2)), q, q, v)

    def flops(da, dc):  # A B^T, (.) C, A S, B^T C per block
        return programs * steps * (2 * block * block * da + 2 * block * block * dc + 4 * block * da * dc)

    # forward (q, k, v) and dq = forward(dO, V, K); dv = reverse(K, Q, dO), dk = reverse(V, dO, Q)
    assert sorted((name, c.flops) for name, c in costs) == sorted([
        ("lightning_scan", flops(h, hv)), ("lightning_scan", flops(hv, h)),
        ("lightning_scan_reverse", flops(h, hv)), ("lightning_scan_reverse", flops(hv, h))])
    powers = steps * block * block + steps * (2 * block + 1)  # grid mode: the [L, L] decay once per step
    assert {c.transcendentals for _, c in costs} == ({programs * powers} if decay else {0})
    forward = costs[0][1]  # a, b [Tp, 32] and c, out [Tp, 64] in bf16; the final state out in fp32
    assert forward.bytes_accessed == programs * (tp * (2 * h * 2 + 2 * hv * 2) + h * hv * 4)


def test_estimates_are_in_the_lowered_tpu_module():
    """Mosaic's custom calls carry the estimates (their backend config), so XLA's cost analysis counts them."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    fn = _flash_grad(q, q, q, is_causal=True)
    text = lowered_text(fn, q, q, q, target="tpu").replace("\\22", '"').replace("\\0A", "")
    found = [json.loads(m) for m in re.findall(r'"cost_estimate": (\{[^}]*\})', text)]
    want = pallas_call_costs(fn, q, q, q)
    assert sorted((e["flops"], e["bytes_accessed"]) for e in found) == sorted(
        (c.flops, c.bytes_accessed) for c in want.values())
