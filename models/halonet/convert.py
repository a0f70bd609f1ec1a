"""Strict import of timm `ByobNet` (`halonet*`) state dicts into `HaloNet`.

The module tree mirrors timm's names, so the loader is a walk over both: `stem.conv{i}` (or `stem.conv`/`stem.bn`
for a single unpooled stem conv), `stages.{i}.{j}.{shortcut,conv1_1x1,conv2_kxk,attn,self_attn,post_attn,
conv3_1x1}`, `final_conv`, `head.fc`. PyTorch layouts are converted (`[out, in, kh, kw]` -> `[kh, kw, in, out]`,
Linear transposed); timm's kv projection keeps its per-head `[k, v]` channel order, which `HaloAttention` uses as is.
A stage's scanned blocks (`stage.py`) load cycle by cycle into sliced copies whose values are stacked back.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.convert import StrictLoader, register_checkpoint, register_loader
from jaxattn.models.halonet.layers import ConvBnAct, HaloAttention
from jaxattn.models.halonet.model import HaloNet
from jaxattn.models.halonet.stage import Stage


def _variables(module) -> list[nnx.Variable]:
    return [v for _, v in nnx.iter_graph(module) if isinstance(v, (nnx.Param, nnx.BatchStat))]


class _Loader(StrictLoader):
    def stacked(self, stack, load_unit) -> None:
        """`load_unit(u, cycle)` for each cycle of a scanned `Stack`, on copies sliced from its arrays; then each
        stacked variable whose slices were all set gets their values stacked (and counts as set)."""
        graphdef, state = nnx.split(stack.blocks)
        units = [nnx.merge(graphdef, jax.tree.map(lambda a, u=u: a[u], state)) for u in range(stack.n)]
        for u, unit in enumerate(units):
            load_unit(u, unit)
        slices = [_variables(unit) for unit in units]
        for i, variable in enumerate(_variables(stack.blocks)):
            parts = [unit_vars[i] for unit_vars in slices]
            if all(id(p) in self.assigned for p in parts):
                variable[...] = jnp.stack([p[...] for p in parts])
                self.assigned.add(id(variable))


def _conv_bn(loader: StrictLoader, module: ConvBnAct, prefix: str) -> None:
    loader.conv(module.conv, f"{prefix}.conv")
    loader.batch_norm(module.bn, f"{prefix}.bn")


def _halo(loader: StrictLoader, module: HaloAttention, prefix: str) -> None:
    loader.conv(module.q, f"{prefix}.q")
    loader.conv(module.kv, f"{prefix}.kv")
    loader.set(module.pos_embed.height_rel, f"{prefix}.pos_embed.height_rel")
    loader.set(module.pos_embed.width_rel, f"{prefix}.pos_embed.width_rel")


def _block(loader: StrictLoader, block, prefix: str) -> None:
    if block.shortcut is not None:
        _conv_bn(loader, block.shortcut, f"{prefix}.shortcut")
    _conv_bn(loader, block.conv1_1x1, f"{prefix}.conv1_1x1")
    if hasattr(block, "self_attn"):
        _halo(loader, block.self_attn, f"{prefix}.self_attn")
        loader.batch_norm(block.post_attn, f"{prefix}.post_attn")
    else:
        _conv_bn(loader, block.conv2_kxk, f"{prefix}.conv2_kxk")
        if block.attn is not None:
            loader.conv(block.attn.fc1, f"{prefix}.attn.fc1")
            loader.conv(block.attn.fc2, f"{prefix}.attn.fc2")
    _conv_bn(loader, block.conv3_1x1, f"{prefix}.conv3_1x1")


def _stage(loader: _Loader, stage: Stage, prefix: str) -> None:
    _block(loader, stage.first, f"{prefix}.0")
    if stage.repeat is not None:
        def load_unit(u, cycle):
            for k, block in enumerate(cycle.blocks):
                _block(loader, block, f"{prefix}.{stage.block_index(u, k)}")
        if stage.scanned:
            loader.stacked(stage.repeat, load_unit)
        else:
            for u, cycle in enumerate(stage.repeat.blocks):
                load_unit(u, cycle)
    for k, block in enumerate(stage.tail):
        _block(loader, block, f"{prefix}.{stage.tail_start + k}")


def load_timm_halonet(model: HaloNet, state_dict) -> HaloNet:
    """Fills `model` from a timm `ByobNet` state dict (names -> numpy arrays); every key and variable must match."""
    loader = _Loader(model, state_dict)
    if model.stem.single:
        _conv_bn(loader, model.stem.convs[0], "stem")
    else:
        for i, conv in enumerate(model.stem.convs):
            _conv_bn(loader, conv, f"stem.conv{i + 1}")
    for i, stage in enumerate(model.stages):
        _stage(loader, stage, f"stages.{i}")
    if model.final_conv is not None:
        _conv_bn(loader, model.final_conv, "final_conv")
    if model.fc is not None:
        loader.linear(model.fc, "head.fc")
    return loader.finish()


register_loader("timm", HaloNet, load_timm_halonet)
for _name in ("halonet26t", "halonet50ts", "halonet_h1", "sehalonet33ts"):
    register_checkpoint("timm", _name, _name)
