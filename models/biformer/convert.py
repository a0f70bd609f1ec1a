"""Weight import from rayleizhu/BiFormer state dicts (`models/biformer.py` names; the released `.pth` files hold
the state dict under `"model"`: pass `checkpoint["model"]`, or the file's path with `allow_pickle=True`).

    downsample_layers.0.{0,3} conv, .0.{1,4} BatchNorm (the stem); downsample_layers.{i}.0 conv, .{i}.1 BatchNorm
    stages.{i}.{j}.pos_embed, .norm1, .norm2, .mlp.{0,3}, [.gamma1, .gamma2]
        BRA:    .attn.qkv.qkv (regrouped per head, `layers.fused_qkv_per_head`), .attn.wo, .attn.lepe
        global: .attn.qkv (no bias), .attn.proj, .attn.lepe
    norm (BatchNorm), head

Either block layout loads (`BiFormer(scan_blocks=...)`): the loader fills every block as its own module (a scanned
stage's are slices of its stacks) and stacks them back. `to_unrolled` / `from_unrolled` convert a model's pure
state (`nnx.to_pure_dict`) between its layout and the unrolled one (`stages.{i}.blocks.{j}.*`).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from jaxattn.models.convert import StrictLoader, register_checkpoint, register_loader
from jaxattn.models.convert.common import torch_linear
from jaxattn.models.layers.stack import blocks_to_stacked, stacked_to_blocks

from .layers import fused_qkv_per_head
from .model import AttentionLePE, BiFormer

_LOADED = (nnx.Param, nnx.BatchStat)


def to_unrolled(state: Mapping, model: BiFormer) -> dict:
    """`model`'s pure state (or one of the same layout) with every stage's blocks keyed by index."""
    return _map_stages(state, model, lambda blocks, stage: stacked_to_blocks(blocks, stage.n))


def from_unrolled(state: Mapping, model: BiFormer) -> dict:
    """An unrolled pure state in `model`'s layout (the blocks of its scanned stages stacked)."""
    def stack(blocks, stage):
        if sorted(blocks) != list(range(stage.n)):
            raise ValueError(f"a stage of {stage.n} blocks needs blocks 0..{stage.n - 1}, got {sorted(blocks)}")
        return blocks_to_stacked(blocks)
    return _map_stages(state, model, stack)


def _map_stages(state, model, convert):
    state = dict(state)
    stages = dict(state["stages"])
    for i, stage in enumerate(model.stages):
        if stage.scan:
            stages[i] = {**stages[i], "blocks": convert(dict(stages[i]["blocks"]), stage)}
    return {**state, "stages": stages}


def _separate_blocks(stage) -> list[nnx.Module]:
    """A stage's blocks as separate modules: its own (unrolled) or copies built from slices of its stacks."""
    if not stage.scan:
        return list(stage.blocks)
    graphdef, state = nnx.split(stage.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(stage.n)]


class BiFormerBlocks(nnx.Module):
    """The layers of a `BiFormer` with every block a module of its own (what the loader fills)."""

    def __init__(self, model: BiFormer):
        self.downsample_layers, self.norm, self.head = model.downsample_layers, model.norm, model.head
        self.stages = nnx.List([nnx.List(_separate_blocks(stage)) for stage in model.stages])


def _load_block(ld: StrictLoader, block, p: str) -> None:
    if block.pos_embed is not None:
        ld.conv(block.pos_embed, f"{p}.pos_embed")
    ld.layer_norm(block.norm1, f"{p}.norm1")
    attn = block.attn
    if isinstance(attn, AttentionLePE):
        _projection(ld, attn.qkv, f"{p}.attn.qkv")
        _projection(ld, attn.proj, f"{p}.attn.proj")
    else:
        per_head = lambda w: fused_qkv_per_head(w, attn.qk_dim, attn.num_heads)
        ld.set(attn.qkv.kernel, f"{p}.attn.qkv.qkv.weight", lambda w: per_head(torch_linear(w)))
        ld.set(attn.qkv.bias, f"{p}.attn.qkv.qkv.bias", per_head)
        _projection(ld, attn.wo, f"{p}.attn.wo")
    if attn.lepe is not None:
        ld.conv(attn.lepe, f"{p}.attn.lepe")
    ld.layer_norm(block.norm2, f"{p}.norm2")
    _projection(ld, block.fc1, f"{p}.mlp.0")
    _projection(ld, block.fc2, f"{p}.mlp.3")
    if block.gamma1 is not None:
        ld.set(block.gamma1, f"{p}.gamma1")
        ld.set(block.gamma2, f"{p}.gamma2")


def _projection(ld: StrictLoader, proj, prefix: str) -> None:
    """A `layers.Projection` from a torch Linear `[out, in]`: the kernel's dim groups are reshapes of in / out."""
    shape = proj.kernel.get_value().shape
    ld.set(proj.kernel, f"{prefix}.weight", lambda w: torch_linear(w).reshape(shape))
    if proj.bias is not None:
        ld.set(proj.bias, f"{prefix}.bias", lambda b: np.asarray(b).reshape(proj.bias.get_value().shape))


def load_biformer_state_dict(model: BiFormer, state_dict) -> BiFormer:
    """Fills `model` from a reference state dict (strict: every key used, every variable set, shapes checked)."""
    view = BiFormerBlocks(model)
    ld = StrictLoader(view, state_dict)
    stem = view.downsample_layers[0]
    ld.conv(stem.conv1, "downsample_layers.0.0")
    ld.batch_norm(stem.bn1, "downsample_layers.0.1")
    ld.conv(stem.conv2, "downsample_layers.0.3")
    ld.batch_norm(stem.bn2, "downsample_layers.0.4")
    for i, down in enumerate(view.downsample_layers[1:], start=1):
        ld.conv(down.conv, f"downsample_layers.{i}.0")
        ld.batch_norm(down.bn, f"downsample_layers.{i}.1")
    for i, blocks in enumerate(view.stages):
        for j, block in enumerate(blocks):
            _load_block(ld, block, f"stages.{i}.{j}")
    if view.norm is not None:  # None once pruned to a backbone
        ld.batch_norm(view.norm, "norm")
    if view.head is not None:
        _projection(ld, view.head, "head")
    ld.finish()
    for stage, blocks in zip(model.stages, view.stages):
        if stage.scan:  # the filled copies back onto the stacks
            stacked = blocks_to_stacked({j: nnx.to_pure_dict(nnx.state(b, _LOADED)) for j, b in enumerate(blocks)})
            state = nnx.state(stage.blocks, _LOADED)
            nnx.replace_by_pure_dict(state, stacked)
            nnx.update(stage.blocks, state)
    return model


register_loader("biformer", BiFormer, load_biformer_state_dict)

# Released ImageNet-1k checkpoints (models/biformer.py model_urls), 224 px.
for _size in ("tiny", "small", "base"):
    register_checkpoint("biformer", f"biformer_{_size}_in1k", f"biformer_{_size}")
