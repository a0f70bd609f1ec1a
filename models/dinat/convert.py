"""Weight import from SHI-Labs NAT/DiNAT state dicts (`classification/nat.py` + natten 0.14 names).

    patch_embed.proj.{0,1}.{weight,bias}, patch_embed.norm.*
    levels.{i}.blocks.{j}.{norm1,norm2}.*, .attn.{qkv,proj}.*, .attn.rpb, .mlp.{fc1,fc2}.*, [.gamma1, .gamma2]
    levels.{i}.downsample.reduction.weight, levels.{i}.downsample.norm.*
    norm.*, head.*

Attention's `qkv.weight [3C, C]` becomes `[C, 3, heads, head_dim]` and `proj.weight [C, C]` becomes
`[heads, head_dim, C]` (heads as a dim of their own, for tensor parallelism); scanned models are filled through
per-unit views of their stacks (`DiNATPerBlock`). Checkpoint names are the official file names
(`dinat_mini_in1k_224`, ...). `from_dinat` reads the class count from `head.weight`.
"""
from __future__ import annotations

import math

from flax import nnx

from jaxattn.models.convert import StrictLoader, register_checkpoint, register_loader, torch_linear

from . import stacking
from .model import DiNAT

# DiNAT-L at 224 with 11x11 windows keeps the 224/7 dilations (stage 0: 11 * 8 = 88 > 56, so the map is padded).
_DILATIONS_224_K7 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]


class DiNATPerBlock(nnx.Module):
    """`model` seen with the reference's names (`levels.{i}.blocks.{j}`), whatever its layout: its own modules,
    except that the units of scanned stacks are per-unit copies (`stacking.unit_views`) until `write_back`."""
    model_name = "DiNAT"  # what load errors name

    def __init__(self, model: DiNAT):
        self.patch_embed, self.norm, self.head = model.patch_embed, model.norm, model.head
        self.units = nnx.List([nnx.List([nnx.List(stacking.unit_views(segment)) for segment in level.segments])
                               for level in model.levels])
        self.levels = nnx.List([
            nnx.Dict(blocks=nnx.List([units[s][u].blocks[k] for s, u, k in stacking.block_positions(level.plan)]),
                     downsample=level.downsample)
            for level, units in zip(model.levels, self.units)])

    def write_back(self, model: DiNAT) -> None:
        for level, units in zip(model.levels, self.units):
            for segment, views in zip(level.segments, units):
                stacking.write_back(segment, views)


def _reshaped(shape):
    """torch `[out, in]` -> `[in, out]`, then reshaped to `shape` (heads as their own dims) where the sizes fit
    (otherwise left for the loader's shape check to report)."""
    def transform(w):
        w = torch_linear(w)
        return w.reshape(shape) if w.size == math.prod(shape) else w
    return transform


def _heads_linear(ld: StrictLoader, module, prefix: str) -> None:
    """A `model.Projection` (qkv `[C, 3, heads, head_dim]`, proj `[heads, head_dim, C]`) from a torch Linear."""
    ld.set(module.kernel, f"{prefix}.weight", _reshaped(module.kernel.shape))
    if module.bias is not None:
        ld.set(module.bias, f"{prefix}.bias", lambda b: b.reshape(module.bias.shape) if b.size == math.prod(
            module.bias.shape) else b)


def load_dinat_state_dict(model: DiNAT, state_dict) -> DiNAT:
    """Fills `model` (scanned or unrolled) from a reference state dict (strict: every key used, every parameter
    set, shapes checked)."""
    view = DiNATPerBlock(model)
    ld = StrictLoader(view, state_dict)
    ld.conv(view.patch_embed.proj0, "patch_embed.proj.0")
    ld.conv(view.patch_embed.proj1, "patch_embed.proj.1")
    ld.layer_norm(view.patch_embed.norm, "patch_embed.norm")
    for i, level in enumerate(view.levels):
        for j, block in enumerate(level["blocks"]):
            p = f"levels.{i}.blocks.{j}"
            ld.layer_norm(block.norm1, f"{p}.norm1")
            _heads_linear(ld, block.attn.qkv, f"{p}.attn.qkv")
            ld.set(block.attn.rpb, f"{p}.attn.rpb")
            _heads_linear(ld, block.attn.proj, f"{p}.attn.proj")
            ld.layer_norm(block.norm2, f"{p}.norm2")
            ld.linear(block.mlp.fc1, f"{p}.mlp.fc1")
            ld.linear(block.mlp.fc2, f"{p}.mlp.fc2")
            if block.gamma1 is not None:
                ld.set(block.gamma1, f"{p}.gamma1")
                ld.set(block.gamma2, f"{p}.gamma2")
        if level["downsample"] is not None:
            ld.conv(level["downsample"].reduction, f"levels.{i}.downsample.reduction")
            ld.layer_norm(level["downsample"].norm, f"levels.{i}.downsample.norm")
    if view.norm is not None:  # None once pruned to a backbone
        ld.layer_norm(view.norm, "norm")
    if view.head is not None:
        ld.linear(view.head, "head")
    ld.finish()
    view.write_back(model)
    return model


register_loader("dinat", DiNAT, load_dinat_state_dict)

# Official checkpoint files (classification/dinat.py model_urls); ImageNet-22k heads have 21841 classes.
for _size in ("mini", "tiny", "small", "base"):
    register_checkpoint("dinat", f"dinat_{_size}_in1k_224", f"dinat_{_size}")
register_checkpoint("dinat", "dinat_large_in22k_in1k_224", "dinat_large")
register_checkpoint("dinat", "dinat_large_in22k_in1k_384", "dinat_large", img_size=384)
register_checkpoint("dinat", "dinat_large_in22k_in1k_384_11x11", "dinat_large", img_size=384, kernel_size=11)
register_checkpoint("dinat", "dinat_large_in22k_224", "dinat_large", drop_path_rate=0.2)
register_checkpoint("dinat", "dinat_large_in22k_224_11x11interp", "dinat_large", kernel_size=11,
                    dilations=_DILATIONS_224_K7, drop_path_rate=0.2)
