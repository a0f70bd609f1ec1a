"""Per-layer names for a `CausalLM`'s parameters, whatever its layout (scanned or unrolled).

A model's pure state (`nnx.to_pure_dict(nnx.state(model))`) holds its layers in segments: `segments/<s>/blocks/...`
with a leading layer axis when scanned, `segments/<s>/blocks/<j>/...` when unrolled. The per-layer layout names
each layer by its index in the whole model, as reference checkpoints do: `layers/<i>/mixer/...`, `layers/<i>/mlp/...`
(`embed`, `head` unchanged). `to_per_layer` and `from_per_layer` convert both ways, exactly (slices and stacks).

    per_layer = to_per_layer(nnx.to_pure_dict(nnx.state(model)), model)
    state = nnx.state(other_model)                 # any layout, same sizes
    nnx.replace_by_pure_dict(state, from_per_layer(per_layer, other_model))
    nnx.update(other_model, state)
"""
from __future__ import annotations

from collections.abc import Mapping

from jaxattn.models.layers.stack import blocks_to_stacked, stacked_to_blocks


def to_per_layer(model_state: Mapping, model) -> dict:
    """`model`'s pure state as `{..., 'layers': {i: layer_state}}` (`model`: the `CausalLM` it came from, or
    one of the same configuration and layout)."""
    state = dict(model_state)
    segments = state.pop("segments")
    layers = {}
    for s, (first, n) in enumerate(model.segment_bounds):
        blocks = segments[s]["blocks"]
        per_block = stacked_to_blocks(blocks, n) if model.scan_layers else blocks
        for j in range(n):
            layers[first + j] = dict(per_block[j])
    return {**state, "layers": layers}


def from_per_layer(per_layer: Mapping, model) -> dict:
    """The per-layer layout as a pure state in `model`'s layout (scanned segments stacked, unrolled ones not)."""
    state = dict(per_layer)
    layers = state.pop("layers")
    expected = list(range(model.num_layers))
    if sorted(layers) != expected:
        raise ValueError(f"`per_layer` must hold layers 0..{model.num_layers - 1}, got {sorted(layers)}")
    segments = {}
    for s, (first, n) in enumerate(model.segment_bounds):
        blocks = {j: layers[first + j] for j in range(n)}
        segments[s] = {"blocks": blocks_to_stacked(blocks) if model.scan_layers else blocks}
    return {**state, "segments": segments}
