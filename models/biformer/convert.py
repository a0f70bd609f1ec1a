"""Weight import from rayleizhu/BiFormer state dicts (`models/biformer.py` names; the released `.pth` files hold
the state dict under `"model"`: pass `checkpoint["model"]`, or the file's path with `allow_pickle=True`).

    downsample_layers.0.{0,3} conv, .0.{1,4} BatchNorm (the stem); downsample_layers.{i}.0 conv, .{i}.1 BatchNorm
    stages.{i}.{j}.pos_embed, .norm1, .norm2, .mlp.{0,3}, [.gamma1, .gamma2]
        BRA:    .attn.qkv.qkv, .attn.wo, .attn.lepe
        global: .attn.qkv (no bias), .attn.proj, .attn.lepe
    norm (BatchNorm), head
"""
from __future__ import annotations

from jaxattn.models.convert import StrictLoader, register_checkpoint, register_loader

from .model import AttentionLePE, BiFormer


def load_biformer_state_dict(model: BiFormer, state_dict) -> BiFormer:
    """Fills `model` from a reference state dict (strict: every key used, every variable set, shapes checked)."""
    ld = StrictLoader(model, state_dict)
    stem = model.downsample_layers[0]
    ld.conv(stem.conv1, "downsample_layers.0.0")
    ld.batch_norm(stem.bn1, "downsample_layers.0.1")
    ld.conv(stem.conv2, "downsample_layers.0.3")
    ld.batch_norm(stem.bn2, "downsample_layers.0.4")
    for i, down in enumerate(model.downsample_layers[1:], start=1):
        ld.conv(down.conv, f"downsample_layers.{i}.0")
        ld.batch_norm(down.bn, f"downsample_layers.{i}.1")
    for i, blocks in enumerate(model.stages):
        for j, block in enumerate(blocks):
            p = f"stages.{i}.{j}"
            if block.pos_embed is not None:
                ld.conv(block.pos_embed, f"{p}.pos_embed")
            ld.layer_norm(block.norm1, f"{p}.norm1")
            attn = block.attn
            if isinstance(attn, AttentionLePE):
                ld.linear(attn.qkv, f"{p}.attn.qkv")
                ld.linear(attn.proj, f"{p}.attn.proj")
            else:
                ld.linear(attn.qkv, f"{p}.attn.qkv.qkv")
                ld.linear(attn.wo, f"{p}.attn.wo")
            if attn.lepe is not None:
                ld.conv(attn.lepe, f"{p}.attn.lepe")
            ld.layer_norm(block.norm2, f"{p}.norm2")
            ld.linear(block.fc1, f"{p}.mlp.0")
            ld.linear(block.fc2, f"{p}.mlp.3")
            if block.gamma1 is not None:
                ld.set(block.gamma1, f"{p}.gamma1")
                ld.set(block.gamma2, f"{p}.gamma2")
    if model.norm is not None:  # None once pruned to a backbone
        ld.batch_norm(model.norm, "norm")
    if model.head is not None:
        ld.linear(model.head, "head")
    return ld.finish()


register_loader("biformer", BiFormer, load_biformer_state_dict)

# Released ImageNet-1k checkpoints (models/biformer.py model_urls), 224 px.
for _size in ("tiny", "small", "base"):
    register_checkpoint("biformer", f"biformer_{_size}_in1k", f"biformer_{_size}")
