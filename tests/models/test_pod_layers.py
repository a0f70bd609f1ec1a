"""The shared pod mechanisms of `models/layers`: logical axes and their rules, the remat policies, `Stack` (scan or
unrolled, per-block inputs and outputs, mutable state) and the stacked <-> per-block conversion, dtype checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from jaxattn.models.layers import axes, precision, remat
from jaxattn.models.layers.drop_path import DropPath, DropRate
from jaxattn.models.layers.stack import Stack, blocks_to_stacked, stacked_to_blocks
from jaxattn.testing.lowering import jaxpr_equations

MESH = AbstractMesh((2, 4, 2, 2), ("data", "fsdp", "context", "tensor"))


@pytest.mark.parametrize("names,shape,expected", [
    ((axes.EMBED, axes.MLP), (64, 256), P(("fsdp", "context"), "tensor")),
    ((axes.EMBED, axes.MLP), (12, 256), P("fsdp", "tensor")),  # 12 rows split 4 ways, not 8: context dropped
    ((axes.EMBED, axes.MLP), (6, 3), P(None, None)),  # nothing divides: replicated
    ((axes.LAYERS, axes.EMBED, axes.HEADS, axes.HEAD_DIM), (3, 8, 4, 5), P(None, ("fsdp", "context"), "tensor", None)),
    ((axes.BATCH, axes.LENGTH, axes.ACT_EMBED), (8, 16, 32), P(("data", "fsdp"), "context", None)),
    ((None, "unknown_name"), (8, 8), P(None, None)),
    ((axes.BATCH, axes.EMBED), (8, 8), P(("data", "fsdp"), "context")),  # fsdp already taken by the batch
])
def test_resolve(names, shape, expected):
    assert axes.resolve(names, shape, MESH, axes.RULES) == expected


def test_resolve_drops_absent_and_size_one_axes():
    mesh = AbstractMesh((8, 1), ("data", "fsdp"))
    assert axes.resolve((axes.EMBED, axes.HEADS), (64, 8), mesh, axes.RULES) == P(None, None)
    with pytest.raises(ValueError, match="do not match"):
        axes.resolve((axes.EMBED,), (4, 4), mesh, axes.RULES)


def test_rule_overrides():
    table = axes.rules((("activation_embed", "tensor"), ("embed", ("fsdp",)), ("vocab", None)))
    assert table[axes.ACT_EMBED] == ("tensor",) and table[axes.EMBED] == ("fsdp",) and table[axes.VOCAB] == ()
    assert table[axes.MLP] == axes.RULES[axes.MLP]  # untouched names keep the table's entry
    with pytest.raises(ValueError, match="logical_axis_rules"):
        axes.rules((("embed",),))


def test_constrain_uses_the_rules_in_scope_and_is_a_noop_without_a_mesh():
    x = jnp.zeros((4, 8))
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda a: axes.constrain(a, (axes.BATCH, axes.MLP)))(x))
    mesh = AbstractMesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)

    def spec_in(rules):
        with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(rules):
            jaxpr = jax.make_jaxpr(lambda a: axes.constrain(a, (axes.BATCH, axes.MLP)))(x)
        (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"]
        return eqn.params["sharding"].spec
    assert spec_in(()) == P("data", "tensor")
    assert spec_in((("mlp", None),)) == P("data", None)


def test_annotations_are_metadata_only():
    """Annotated parameters build without a mesh (no eager sharding) and carry their names."""
    param = nnx.Param(jnp.zeros((2, 3)), **axes.param_metadata((axes.EMBED, axes.MLP)))
    assert axes.logical_names(param) == (axes.EMBED, axes.MLP)
    kernel = nnx.Linear(2, 3, kernel_init=axes.annotate(nnx.initializers.zeros, (axes.EMBED, axes.MLP)),
                        rngs=nnx.Rngs(0)).kernel
    assert axes.logical_names(kernel) == (axes.EMBED, axes.MLP)
    assert axes.logical_names(nnx.Param(jnp.zeros(3))) is None


class _Block(nnx.Module):
    """`x + tanh(x W) * c`; with `count`, counts its calls in a non-parameter variable."""

    def __init__(self, rngs, count=False):
        self.w = nnx.Param(nnx.initializers.normal(0.5)(rngs.params(), (6, 6)),
                           **axes.param_metadata((axes.EMBED, axes.MLP)))
        self.calls = nnx.data(nnx.BatchStat(jnp.zeros((), jnp.int32)) if count else None)

    def __call__(self, x, scale=1.0):
        if self.calls is not None:
            self.calls[...] += 1
        return x + jnp.tanh(x @ self.w[...]) * scale


def _stack(scan, policy="none", n=3, count=False):
    return Stack(lambda r: _Block(r, count), n, rngs=nnx.Rngs(0), scan=scan, remat=policy)


def _loss_and_grads(stack, x):
    def loss(s):
        return jnp.sum(s(x, 0.5) ** 2)
    return nnx.value_and_grad(loss)(stack)


def test_scanned_stack_equals_unrolled_and_every_policy_agrees():
    x = jax.random.normal(jax.random.key(1), (2, 6))
    scanned = _stack(True)
    assert scanned.blocks.w.shape == (3, 6, 6)
    assert axes.logical_names(scanned.blocks.w) == (axes.LAYERS, axes.EMBED, axes.MLP)
    unrolled = _stack(False)
    per_block = stacked_to_blocks(nnx.to_pure_dict(nnx.state(scanned, nnx.Param))["blocks"], 3)
    params = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(params, {"blocks": per_block})
    nnx.update(unrolled, params)
    loss, grads = _loss_and_grads(scanned, x)
    for policy in remat.POLICIES:  # the policy is really applied (and 'none' adds nothing)
        graphdef, state = nnx.split(_stack(True, policy))
        eqns = jaxpr_equations(lambda st, h: nnx.merge(graphdef, st)(h), state, x)
        assert any(e.primitive.name == "remat2" for e in eqns) == (policy != "none"), policy
    for stack in (unrolled, *(_stack(True, p) for p in remat.POLICIES if p != "none"),
                  *(_stack(False, p) for p in ("full", "dots_saveable"))):
        if not stack.scan:
            nnx.update(stack, params)
        got_loss, got = _loss_and_grads(stack, x)
        np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
        got_w = got["blocks"]["w"][...] if stack.scan else jnp.stack([got["blocks"][i]["w"][...] for i in range(3)])
        np.testing.assert_allclose(got_w, grads["blocks"]["w"][...], rtol=1e-5, atol=1e-7)


def test_stack_carries_state_inputs_and_outputs_and_works_closed_over_by_jit():
    x = jnp.ones((2, 6))
    for scan in (True, False):
        counting = _stack(scan, count=True)
        _, outs = counting.apply(lambda block, h, scale, s: (block(h, scale), jnp.sum(h) * s), x, jnp.arange(3.0),
                                 2.0)
        assert outs.shape == (3,) and float(outs[0]) == pytest.approx(24.0)
        calls = [counting.blocks[i].calls[...] for i in range(3)] if not scan else counting.blocks.calls[...]
        assert np.asarray(calls).tolist() == [1, 1, 1]  # each block's mutable state was written back
    stack, unrolled = _stack(True), _stack(False)
    jax.jit(lambda h: unrolled(h))(x)  # a model captured by jit, not passed in
    np.testing.assert_allclose(jax.jit(lambda h: stack(h, 0.0))(x), x)


class _DropBlock(nnx.Module):
    """`x + DropPath(rate)(1)`: what reaches the output shows which samples each block dropped."""

    def __init__(self, rngs, rate):
        self.drop = DropPath(rate, rngs=rngs)

    def __call__(self, x):
        return x + self.drop(jnp.ones_like(x))


@pytest.mark.parametrize("scan", [True, False])
def test_per_block_drop_path_rates(scan):
    stack = Stack(_DropBlock, 2, rngs=nnx.Rngs(0, dropout=1), scan=scan, block_args=((0.0, 0.5),))
    if scan:
        assert isinstance(stack.blocks.drop.rate, DropRate) and stack.blocks.drop.rate.shape == (2,)
    else:
        assert [b.drop.rate for b in stack.blocks] == [0.0, 0.5]  # static: block 0 draws no mask
    added = np.asarray(jax.jit(lambda s, x: s(x))(stack, jnp.zeros((4000, 1))))
    assert set(np.unique(added)) == {1.0, 3.0}  # block 0 always kept; block 1 dropped, or kept and scaled by 2
    assert abs(np.mean(added == 1.0) - 0.5) < 0.05
    stack.eval()
    np.testing.assert_array_equal(stack(jnp.zeros((3, 1))), 2.0)
    with pytest.raises(ValueError, match="one item per block"):
        Stack(_DropBlock, 2, rngs=nnx.Rngs(0), block_args=((0.1,),))
    with pytest.raises(ValueError, match="`rate` must be in"):
        DropPath(jnp.float32(1.0))


def test_block_state_conversion_round_trip():
    stacked = {"w": np.arange(24.0).reshape(3, 2, 4), "sub": {"b": np.arange(3.0)}}
    blocks = stacked_to_blocks(stacked, 3)
    np.testing.assert_array_equal(blocks[1]["w"], stacked["w"][1])
    back = blocks_to_stacked(blocks)
    assert isinstance(back["w"], np.ndarray)  # host arrays stay on the host
    jax.tree.map(np.testing.assert_array_equal, back, stacked)
    with pytest.raises(ValueError, match="keyed 0..n-1"):
        blocks_to_stacked({1: blocks[1]})


def test_bad_options_raise():
    with pytest.raises(ValueError, match="`remat` must be one of"):
        _stack(True, "everything")
    with pytest.raises(ValueError, match="`n`"):
        Stack(_Block, 0, rngs=nnx.Rngs(0))
    assert precision.check_dtype("dtype", "bfloat16") == jnp.bfloat16
    assert precision.check_dtype("dtype", None, allow_none=True) is None
    for bad in (None, "int32", "fp8ish"):
        with pytest.raises(ValueError, match="`param_dtype` must be a floating-point dtype"):
            precision.check_dtype("param_dtype", bad)
