"""Weight import from SHI-Labs NAT/DiNAT state dicts (`classification/nat.py` + natten 0.14 names).

    patch_embed.proj.{0,1}.{weight,bias}, patch_embed.norm.*
    levels.{i}.blocks.{j}.{norm1,norm2}.*, .attn.{qkv,proj}.*, .attn.rpb, .mlp.{fc1,fc2}.*, [.gamma1, .gamma2]
    levels.{i}.downsample.reduction.weight, levels.{i}.downsample.norm.*
    norm.*, head.*

Checkpoint names are the official file names (`dinat_mini_in1k_224`, ...). `from_dinat` reads the class count
from `head.weight`.
"""
from __future__ import annotations

from jaxattn.models.convert import StrictLoader, register_checkpoint, register_loader

from .model import DiNAT

# DiNAT-L at 224 with 11x11 windows keeps the 224/7 dilations (stage 0: 11 * 8 = 88 > 56, so the map is padded).
_DILATIONS_224_K7 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]


def load_dinat_state_dict(model: DiNAT, state_dict) -> DiNAT:
    """Fills `model` from a reference state dict (strict: every key used, every parameter set, shapes checked)."""
    ld = StrictLoader(model, state_dict)
    ld.conv(model.patch_embed.proj0, "patch_embed.proj.0")
    ld.conv(model.patch_embed.proj1, "patch_embed.proj.1")
    ld.layer_norm(model.patch_embed.norm, "patch_embed.norm")
    for i, level in enumerate(model.levels):
        for j, block in enumerate(level.blocks):
            p = f"levels.{i}.blocks.{j}"
            ld.layer_norm(block.norm1, f"{p}.norm1")
            ld.linear(block.attn.qkv, f"{p}.attn.qkv")
            ld.set(block.attn.rpb, f"{p}.attn.rpb")
            ld.linear(block.attn.proj, f"{p}.attn.proj")
            ld.layer_norm(block.norm2, f"{p}.norm2")
            ld.linear(block.mlp.fc1, f"{p}.mlp.fc1")
            ld.linear(block.mlp.fc2, f"{p}.mlp.fc2")
            if block.gamma1 is not None:
                ld.set(block.gamma1, f"{p}.gamma1")
                ld.set(block.gamma2, f"{p}.gamma2")
        if level.downsample is not None:
            ld.conv(level.downsample.reduction, f"levels.{i}.downsample.reduction")
            ld.layer_norm(level.downsample.norm, f"levels.{i}.downsample.norm")
    if model.norm is not None:  # None once pruned to a backbone
        ld.layer_norm(model.norm, "norm")
    if model.head is not None:
        ld.linear(model.head, "head")
    return ld.finish()


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
