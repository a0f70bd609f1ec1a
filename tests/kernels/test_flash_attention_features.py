"""Pallas flash attention's issue-16 features (attention sinks, logit soft-cap, per-head windows, kv_lengths, block
masks) against a dense formula (`flash_features_dense.py`), forward and gradients (sinks included), in both
reduction walks; the walk tables visit exactly the blocks that hold a visible logit; bad arguments raise."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flash_features_dense import dense_attention, feature_case

from jaxattn.kernels.flash_attention import pallas, walk
from jaxattn.kernels.flash_attention.blocks import BlockSizes
from jaxattn.kernels.flash_attention.tile import Problem
from jaxattn.testing import assert_matches_reference

SMALL = BlockSizes.uniform(16, 16)
B, T, S, N, K, H = 2, 37, 50, 2, 1, 16  # odd lengths, T != S, GQA
HEAD_WINDOWS = [(8, 3), None]  # one global head
KV_LENGTHS = (20, 45)
BLOCK_MASK = jax.random.bernoulli(jax.random.key(3), 0.5, (1, N, 3, 4))  # [1, N, ceil(37/16), ceil(50/16)]
EVERYTHING = dict(sinks=True, logits_soft_cap=3.0, window=HEAD_WINDOWS, kv_lengths=KV_LENGTHS, is_causal=True,
                  block_mask=BLOCK_MASK, block_shape=(16, 16))
CASES = {
    # static band: sinks and the cap alone
    "sinks_cap_causal": dict(sinks=True, logits_soft_cap=2.0, is_causal=True),
    # every dynamic feature at once (per-head windows, key lengths, block mask) with sinks, cap and causal
    "everything": EVERYTHING,
}


def _case(opts, reduction):
    target = "tpu_interpret" if reduction == "grid" else "interpret"
    kernel = functools.partial(pallas.flash_attention, target=target, block_sizes=SMALL, reduction=reduction)
    return feature_case(kernel, opts, [(B, T, N, H), (B, S, K, H), (B, S, K, H)])


@pytest.mark.parametrize("reduction,name,dtype", [("fori", "sinks_cap_causal", jnp.float32),
                                                  ("grid", "everything", jnp.float32),
                                                  ("fori", "everything", jnp.bfloat16)])
def test_features_match_dense(reduction, name, dtype):
    impl, ref, inputs = _case(CASES[name], reduction)
    assert_matches_reference(impl, ref, inputs, dtype=dtype, names=["query", "key", "value", "sinks"])


def _visible(problem, kv_lengths, block_mask):
    """Dense `[B, N, T, S]` visibility from the dense formula: with zero logits and one-hot values, `out[.., j]`
    is `p_ij`, positive exactly where key `j` is visible."""
    q = jnp.zeros((B, T, N, H))
    k = jnp.zeros((B, S, N, H))
    v = jnp.eye(S)[None, :, None, :].repeat(B, 0).repeat(N, 2)  # out[b, i, n, j] = p_ij > 0 iff j visible
    dense = jax.jit(functools.partial(dense_attention, scale=1.0, causal=problem.is_causal, window=HEAD_WINDOWS,
                                      block_shape=(16, 16)))
    out, _ = dense(q, k, v, kv_lengths=kv_lengths, block_mask=block_mask)
    return np.asarray(jnp.transpose(out, (0, 2, 1, 3)) > 0)


@pytest.mark.parametrize("key_major", [False, True])
def test_walk_visits_exactly_the_needed_blocks(key_major):
    """Each tile's table lists exactly the blocks with at least one visible logit, ascending: the kernels fetch and
    compute nothing else (the 'grid' walk repeats the last listed block, which costs no copy)."""
    problem = Problem.of(T, S, H, is_causal=True, window=HEAD_WINDOWS, kv_lengths=True, block_shape=(16, 16),
                         num_heads=N)
    kv_lengths = jnp.asarray(KV_LENGTHS, jnp.int32)
    nq, nk = 3, 4  # T = 37 and S = 50 padded to 48 and 64
    walk_, table = walk.build(problem, batch=B, heads=N, kv_lengths=kv_lengths, block_mask=BLOCK_MASK, block_q=16,
                              block_k=16, num_q=nq, num_k=nk, key_major=key_major)
    visible = np.zeros((B, N, nq * 16, nk * 16), bool)
    visible[:, :, :T, :S] = _visible(problem, kv_lengths, BLOCK_MASK)
    tiles = visible.reshape(B, N, nq, 16, nk, 16).any(axis=(3, 5))
    if key_major:
        tiles = tiles.transpose(0, 1, 3, 2)
    table = np.asarray(table)
    assert walk_.steps == (nq if key_major else nk)
    for b, n, t in itertools.product(range(B), range(N), range(tiles.shape[2])):
        count = int(walk_.count(table, b, n, t))
        listed = [int(walk_.block(table, b, n, t, r)) for r in range(walk_.steps)]
        assert listed[:count] == list(np.flatnonzero(tiles[b, n, t])), (b, n, t)
        assert all(x == listed[max(count - 1, 0)] for x in listed[count:])
    # The static bound of a band walk: a window of 8 + 1 + 0 keys per 16-row tile touches at most 3 key blocks.
    banded = Problem.of(64, 64, H, is_causal=True, window=[(8, 0), (2, 0)], kv_lengths=True, num_heads=2)
    walk_, _ = walk.build(banded, batch=B, heads=2, kv_lengths=kv_lengths, block_mask=None, block_q=16, block_k=16,
                          num_q=4, num_k=4)
    assert walk_.steps == 3


def test_block_mask_fits_the_tiles():
    """The tiles shrink to divide the mask's blocks; a tile that cannot is refused by name."""
    static = pallas._static(64, 64, 16, 2, scale=None, is_causal=False, window=None, causal_offset=None,
                            block_shape=(32, 64), target="interpret", block_sizes=None, reduction=None)
    assert static.sizes.q_blocks == (32,) * 3 and static.sizes.k_blocks == (64,) * 3
    with pytest.raises(ValueError, match="block_shape"):
        pallas._static(64, 512, 16, 2, scale=None, is_causal=False, window=None, causal_offset=None,
                       block_shape=(32, 64), target="tpu", block_sizes=None, reduction=None)


def test_bad_feature_arguments_raise():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="sinks"):
        pallas.flash_attention(q, q, q, sinks=jnp.zeros((3,)), target="interpret")
    with pytest.raises(ValueError, match="kv_lengths"):
        pallas.flash_attention(q, q, q, kv_lengths=jnp.zeros((1,)), target="interpret")
    with pytest.raises(ValueError, match="block_mask"):
        pallas.flash_attention(q, q, q, block_mask=jnp.ones((1, 2, 2, 1), bool), block_shape=(8, 8),
                               target="interpret")
    with pytest.raises(ValueError, match="window"):
        pallas.flash_attention(q, q, q, window=[(1, 1)] * 3, target="interpret")
    with pytest.raises(ValueError, match="logits_soft_cap"):
        pallas.flash_attention(q, q, q, logits_soft_cap=0.0, target="interpret")
