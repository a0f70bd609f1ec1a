"""`models/context_parallel`: the one mechanism every family's attention layer asks for the op to call."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn.context_parallel import halo_exchange_halo_attention, ring_attention
from jaxattn.models import context_parallel as cp

CONTEXT4 = jax.sharding.AbstractMesh((4,), ("context",))


def _map(rows):
    return jax.ShapeDtypeStruct((1, rows, rows, 1, 8), np.float32)


def test_families_offer_the_strategies_of_their_op():
    assert cp.supported("softmax_lm") == ("ring", "allgather", "ulysses")
    assert cp.supported("transnormer") == ("lasp2",)
    assert cp.supported("dinat") == cp.supported("halonet") == ("halo",)
    assert cp.supported("maxvit") == ()
    assert cp.check_strategy("", "dinat") is None
    with pytest.raises(ValueError, match="`context_parallel` for maxvit must be None"):
        cp.check_strategy("halo", "maxvit")
    with pytest.raises(ValueError, match="`context_parallel` for dinat must be None or one of"):
        cp.check_strategy("ring", "dinat")


def test_the_strategy_runs_only_when_the_context_axis_is_on_and_accepts_the_shapes():
    big, small = _map(16), _map(4)
    assert cp.strategy_function("neighborhood_attention", "halo", big, big, big, 3) is None  # no mesh
    with jax.sharding.use_abstract_mesh(CONTEXT4):
        assert cp.strategy_function("dot_product_attention", None, big, big, big) is None
        assert cp.strategy_function("dot_product_attention", "ring", big, big, big) is ring_attention
        assert cp.strategy_function("neighborhood_attention", "halo", big, big, big, 3) is not None
        # 4 rows over 4 devices: a shard of one row cannot hold a 3-window's border rows (nor a dilated one)
        assert cp.strategy_function("neighborhood_attention", "halo", small, small, small, 3) is None
        assert cp.strategy_function("neighborhood_attention", "halo", big, big, big, 3, dilation=8) is None
        halo = cp.strategy_function("halo_attention", "halo", big, big, big, 4, 2)
        assert halo is not None and halo is not halo_exchange_halo_attention  # drops `implementation`
        assert cp.strategy_function("halo_attention", "halo", small, small, small, 4, 2) is None
        with pytest.raises(ValueError, match="has no version of halo_attention"):
            cp.strategy_function("halo_attention", "ring", big, big, big, 4, 2)
    with pytest.raises(ValueError, match="`op` must be one of"):
        cp.strategy_function("grid_attention", "halo", big, big, big)


def test_without_the_context_axis_the_single_device_op_runs():
    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
    np.testing.assert_array_equal(cp.attention("dot_product_attention", "ring", q, q, q, is_causal=True),
                                  jaxattn.dot_product_attention(q, q, q, is_causal=True))
