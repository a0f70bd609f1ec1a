"""Model FLOPs of one train step (all devices): what the model needs, whatever the compiled program does.

Training costs three forward passes' worth of multiply-adds (forward, and the two products of each backward).

- Causal LMs (`jaxattn.models.lm.CausalLM`, e.g. softmax_lm and transnormer): `6 N D` with `N` the parameters
  except the embedding table (a lookup, not a product; the head counts) and `D = batch x seq_len` tokens, plus
  per layer and sequence, with `d = heads x head_dim`:
  - softmax attention (causal): `6 T^2 d` (QK^T and PV, `2 T^2 d` each forward, halved by the causal mask, x3);
  - lightning (linear) attention in chunks of `C`: `6 T d (C + 2 head_dim)` (within a chunk `2 T C d` forward,
    causal; across chunks `q S` and the state update `k^T v`, `2 T d head_dim` each; x3).
- Any other model: 3 x the forward's products counted on its jaxpr (abstract inputs, nothing runs): `2 x`
  multiply-adds of every `dot_general` and `conv_general_dilated` (every kernel tap, the usual model-FLOPs
  convention), scanned bodies times their length. Attention products count as the op's traced path computes
  them (its `xla` path where dispatch picks it on this host: for neighborhood attention that includes each query
  tile's key halo).
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from . import sharding
from . import state as state_lib


def model_flops_per_step(config, steps, batch) -> float:
    """Model FLOPs of one train step on the global `batch` (`ShapeDtypeStruct`s), all devices together."""
    state = steps.abstract_state
    with nnx.use_eager_sharding(False):  # logical names are not mesh axes
        model = state_lib.merge(steps.model_def.eval_graph, state.params, state.model_state,
                                steps.model_def.rng_state)
    if config.task == "lm" and hasattr(model, "segments") and hasattr(model, "segment_bounds"):
        return causal_lm_flops(model, batch["inputs"].shape)
    return 3.0 * forward_flops(steps, batch)


def causal_lm_flops(model, tokens_shape) -> float:
    batch, length = tokens_shape
    params = nnx.state(model, nnx.Param)
    total = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
    dense = total - math.prod(model.embed.embedding.shape) if hasattr(model.embed, "embedding") else total
    flops = 6.0 * dense * batch * length
    for (_, layers), segment in zip(model.segment_bounds, model.segments):
        mixer = segment.template.mixer
        width = mixer.num_heads * mixer.head_dim
        if hasattr(mixer, "block_size"):  # lightning attention
            per_sequence = 6.0 * length * width * (min(mixer.block_size, length) + 2 * mixer.head_dim)
        else:
            per_sequence = 6.0 * length ** 2 * width
        flops += layers * batch * per_sequence
    return flops


def forward_flops(steps, batch) -> float:
    """`2 x` multiply-adds of the products in the model's forward jaxpr on `batch` (its first array)."""
    inputs = batch["image"] if "image" in batch else batch["inputs"]
    state = steps.abstract_state

    def forward(params, model_state, x):
        model = state_lib.merge(steps.model_def.eval_graph, params, model_state, steps.model_def.rng_state)
        with sharding.logical_axis_scope(()):
            return model(x.astype("float32") if x.dtype == "uint8" else x)

    with jax.set_mesh(steps.mesh):
        jaxpr = jax.make_jaxpr(forward)(state.params, state.model_state, inputs)
    return jaxpr_product_flops(jaxpr.jaxpr, steps.mesh)


def jaxpr_product_flops(jaxpr, mesh=None) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            taps = math.prod(rhs[d] for d in spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * taps
        factor = 1.0
        if name == "scan":
            factor = float(eqn.params["length"])
        elif name == "shard_map" and mesh is not None:  # the body sees one device's shard
            factor = float(math.prod(eqn.params["mesh"].shape.values()))
        subs = [p for p in eqn.params.values() if isinstance(p, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr))]
        subs += [b for p in eqn.params.values() if isinstance(p, tuple) for b in p
                 if isinstance(b, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr))]
        if name == "cond":
            subs = subs[:1] and [max(subs, key=lambda s: jaxpr_product_flops(getattr(s, "jaxpr", s), mesh))]
        for sub in subs:
            total += factor * jaxpr_product_flops(getattr(sub, "jaxpr", sub), mesh)
    return total
