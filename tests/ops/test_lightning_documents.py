"""Lightning attention over packed documents (`segment_ids`): the packed call equals running every document alone
(outputs, the initial state reaching the first document, the final state of the last, gradients), for the
reference and the chunked XLA path, causal and bidirectional, fp32 and bf16, documents crossing block edges."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.core import segments
from jaxattn.testing import assert_matches_reference

F32, BF16 = jnp.float32, jnp.bfloat16
B, T, N, H, HV = 2, 21, 2, 5, 6
NAMES = ["query", "key", "value", "initial_state"]


def _segment_ids():
    """Row 0: documents of 3, 1 (a single token), 10 and 7 tokens, an id reused out of order (a recurring id
    starts a new document); row 1: two documents, split at 8 (a block edge of the 4- and 8-row blocks)."""
    ids = np.zeros((B, T), np.int32)
    ids[0, 3:], ids[0, 4:], ids[0, 14:] = 1, 2, 0
    ids[1, :], ids[1, 8:] = 7, 3
    return ids


def _inputs(seed, dtype=F32):
    rng = np.random.default_rng(seed)
    shapes = [(B, T, N, H), (B, T, N, H), (B, T, N, HV), (B, N, H, HV)]
    return [jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype) for s in shapes]


def _document_bounds(ids):
    starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    return list(zip(starts, starts[1:] + [len(ids)]))


def _per_document(q, k, v, s0, *, slopes, is_causal):
    """Every document of every row run alone through the reference; `s0` starts each row's first document."""
    ids = _segment_ids()
    outs, states = [], []
    for b in range(q.shape[0]):
        pieces, state = [], None
        for d, (lo, hi) in enumerate(_document_bounds(ids[b])):
            kw = dict(slopes=slopes, is_causal=is_causal, implementation="reference")
            if is_causal:
                kw.update(return_state=True, initial_state=s0[b:b + 1] if d == 0 else None)
            out = jaxattn.lightning_attention(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi], v[b:b + 1, lo:hi], **kw)
            if is_causal:
                out, state = out
            pieces.append(out)
        outs.append(jnp.concatenate(pieces, axis=1))
        states.append(state)
    out = jnp.concatenate(outs, axis=0)
    return (out, jnp.concatenate(states, axis=0)) if is_causal else (out,)


def _packed(q, k, v, s0, *, slopes, is_causal, implementation, block):
    kw = dict(return_state=True, initial_state=s0) if is_causal else {}
    out = jaxattn.lightning_attention(q, k, v, slopes=slopes, is_causal=is_causal, segment_ids=_segment_ids(),
                                      block_size=block, implementation=implementation, **kw)
    return out if is_causal else (out,)


# Every variant in one function (one compile per side): (causal, decay, block) with document starts inside and
# on block edges.
VARIANTS = [(True, True, 4), (True, False, 8), (False, True, 8), (False, False, 4)]


def _all_variants(fn, variants=VARIANTS):
    def run(q, k, v, s0):
        outs = []
        for causal, decay, block in variants:
            outs += fn(q, k, v, s0, slopes=jaxattn.lightning_slopes(N) if decay else None, is_causal=causal,
                       block=block)
        return tuple(outs)
    return run


def test_packed_reference_equals_each_document_alone():
    """The reference over packed documents == each document alone (outputs, states, gradients)."""
    packed = _all_variants(functools.partial(_packed, implementation="reference"), VARIANTS[:1] + VARIANTS[2:3])
    alone = _all_variants(lambda *a, block, **kw: _per_document(*a, **kw), VARIANTS[:1] + VARIANTS[2:3])
    assert_matches_reference(packed, alone, _inputs(1), names=NAMES)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_chunked_matches_reference_over_documents(dtype):
    """The 'xla' path over packed documents == the reference, every variant, forward and gradients."""
    chunked = _all_variants(functools.partial(_packed, implementation="xla"))
    reference = _all_variants(functools.partial(_packed, implementation="reference"))
    assert_matches_reference(chunked, reference, _inputs(2), dtype=dtype, names=NAMES)


def test_one_document_is_the_unsegmented_op():
    """Constant ids (and document ids, which map to themselves) give the plain op; odd length, one row."""
    q, k, v, s0 = (x[:1, :19] if x.ndim == 4 and x.shape[1] == T else x[:1] for x in _inputs(3))
    slopes = jaxattn.lightning_slopes(N)
    plain = jaxattn.lightning_attention(q, k, v, slopes=slopes, initial_state=s0, return_state=True,
                                        block_size=8, implementation="xla")
    ones = jnp.full((1, 19), 5, jnp.int32)
    packed = jaxattn.lightning_attention(q, k, v, slopes=slopes, initial_state=s0, return_state=True,
                                         block_size=8, segment_ids=ones, implementation="xla")
    for a, b in zip(plain, packed):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    docs = segments.document_ids(_segment_ids())
    np.testing.assert_array_equal(docs[0], [0] * 3 + [1] + [2] * 10 + [3] * 7)
    np.testing.assert_array_equal(segments.document_ids(docs), docs)


def test_bad_segment_ids_raise():
    q, k, v, _ = _inputs(4)
    with pytest.raises(ValueError, match=r"`segment_ids` must have shape \[batch, length\] = \(2, 21\)"):
        jaxattn.lightning_attention(q, k, v, segment_ids=jnp.zeros((2, 20), jnp.int32))
    with pytest.raises(ValueError, match="`segment_ids` must be integer"):
        jaxattn.lightning_attention(q, k, v, segment_ids=jnp.zeros((2, 21)))
