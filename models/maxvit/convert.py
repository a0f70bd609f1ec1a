"""timm `maxvit_*_tf_*` state dicts -> `MaxViT` (strict), and the timm checkpoint names `from_timm` knows.

    from jaxattn.models import convert
    model = convert.from_timm("maxvit_tiny_tf_224", state_dict)          # builds maxvit_tiny @224, loads
    convert.load_timm(model, state_dict)                                  # fills an existing MaxViT
    sd384 = resize_rel_pos_bias_tables(sd224, window_size=12)           # 224-px weights for a 384-px model

Layouts: 1x1 convs `[out, in, 1, 1]` (or `[out, in]`, as timm's filter also accepts) -> Linear `[in, out]`;
depthwise `[C, 1, 3, 3]` -> `[3, 3, 1, C]`; relative position tables `[heads, 2p-1, 2p-1]` as they are; attention
qkv `[3C, C]` -> `[C, 3, heads, head_dim]` and proj `[C, C]` -> `[heads, head_dim, C]`. Scanned and unrolled models
load alike (timm's `stages.<s>.blocks.0` is our `stages.<s>.first`, blocks 1.. the stage's `rest`).
"""
from __future__ import annotations

import re

import numpy as np

from jaxattn.models.convert import StateDictError, StrictLoader, register_checkpoint, register_loader
from jaxattn.models.convert.common import torch_linear
from jaxattn.models.maxvit.attention import resize_rel_pos_bias
from jaxattn.models.maxvit.model import MaxViT
from jaxattn.models.maxvit.stacking import stage_blocks, unrolled

REL_POS_KEY = "relative_position_bias_table"
_TABLE = re.compile(r"\.attn_(block|grid)\.attn\.rel_pos\.relative_position_bias_table$")


def _pointwise_weight(w):
    w = np.asarray(w)
    if w.ndim == 4 and w.shape[2:] != (1, 1):
        raise StateDictError(f"expected a 1x1 conv weight [out, in, 1, 1], got shape {w.shape}")
    return w.reshape(w.shape[0], -1).T


def _pointwise(loader: StrictLoader, module, prefix: str) -> None:
    loader.set(module.kernel, f"{prefix}.weight", _pointwise_weight)
    if getattr(module, "bias", None) is not None:
        loader.set(module.bias, f"{prefix}.bias")


def _rel_pos(loader: StrictLoader, module, key: str) -> None:
    variable = module.relative_position_bias_table
    if loader.has(key) and tuple(loader.state_dict[key].shape) != tuple(variable[...].shape):
        raise StateDictError(
            f"{key!r}: shape {tuple(loader.state_dict[key].shape)} does not match the model's "
            f"{tuple(variable[...].shape)} (tile size {module.size}); weights trained at another resolution load "
            f"after `jaxattn.models.maxvit.resize_rel_pos_bias_tables(state_dict, window_size=..., grid_size=...)`")
    loader.set(variable, key)


def _mbconv(loader: StrictLoader, conv, prefix: str) -> None:
    if conv.shortcut_expand is not None:
        _pointwise(loader, conv.shortcut_expand, f"{prefix}.shortcut.expand")
    loader.batch_norm(conv.pre_norm, f"{prefix}.pre_norm")
    _pointwise(loader, conv.conv1_1x1, f"{prefix}.conv1_1x1")
    loader.batch_norm(conv.norm1, f"{prefix}.norm1")
    loader.conv(conv.conv2_kxk, f"{prefix}.conv2_kxk")
    loader.batch_norm(conv.norm2, f"{prefix}.norm2")
    _pointwise(loader, conv.se.fc1, f"{prefix}.se.fc1")
    _pointwise(loader, conv.se.fc2, f"{prefix}.se.fc2")
    _pointwise(loader, conv.conv3_1x1, f"{prefix}.conv3_1x1")


def _partition_attention(loader: StrictLoader, layer, prefix: str) -> None:
    loader.layer_norm(layer.norm1, f"{prefix}.norm1")
    # qkv [3C, C] (out channels ordered [3, heads, head_dim]) -> [C, 3, heads, head_dim]; proj [C, C] -> [heads,
    # head_dim, C].
    heads = (layer.num_heads, layer.head_dim)
    loader.set(layer.qkv.kernel, f"{prefix}.attn.qkv.weight", lambda w: torch_linear(w).reshape(-1, 3, *heads))
    loader.set(layer.qkv.bias, f"{prefix}.attn.qkv.bias", lambda b: np.asarray(b).reshape(3, *heads))
    _rel_pos(loader, layer.rel_pos, f"{prefix}.attn.rel_pos.{REL_POS_KEY}")
    loader.set(layer.proj.kernel, f"{prefix}.attn.proj.weight", lambda w: torch_linear(w).reshape(*heads, -1))
    loader.set(layer.proj.bias, f"{prefix}.attn.proj.bias")
    loader.layer_norm(layer.norm2, f"{prefix}.norm2")
    loader.linear(layer.mlp.fc1, f"{prefix}.mlp.fc1")
    loader.linear(layer.mlp.fc2, f"{prefix}.mlp.fc2")


def load_timm_maxvit(model: MaxViT, state_dict) -> MaxViT:
    """Fills `model` from a timm `MaxxVit` (`_tf_cfg`) state dict; every key used, every variable set."""
    loader = StrictLoader(model, state_dict)
    loader.conv(model.stem.conv1, "stem.conv1")
    loader.batch_norm(model.stem.norm1, "stem.norm1")
    loader.conv(model.stem.conv2, "stem.conv2")
    with unrolled(model):  # scanned stacks are filled block by block, then stacked again
        for s, stage in enumerate(model.stages):
            for b, block in enumerate(stage_blocks(stage)):
                prefix = f"stages.{s}.blocks.{b}"
                _mbconv(loader, block.conv, f"{prefix}.conv")
                _partition_attention(loader, block.attn_block, f"{prefix}.attn_block")
                _partition_attention(loader, block.attn_grid, f"{prefix}.attn_grid")
        if model.head is not None:  # None once pruned to a backbone
            loader.layer_norm(model.head.norm, "head.norm")
            loader.linear(model.head.pre_logits, "head.pre_logits.fc")
            if model.head.fc is not None:
                loader.linear(model.head.fc, "head.fc")
        loader.finish()
    return model


def resize_rel_pos_bias_tables(state_dict, window_size, grid_size=None, *, method: str = "bilinear") -> dict:
    """A copy of a timm MaxViT state dict whose relative position tables fit `window_size` (block attention) and
    `grid_size` (grid attention; default `window_size`). See `resize_rel_pos_bias` for `method`."""
    grid_size = window_size if grid_size is None else grid_size
    out = dict(state_dict)
    for key, value in state_dict.items():
        match = _TABLE.search(key)
        if match:
            size = window_size if match.group(1) == "block" else grid_size
            out[key] = np.asarray(resize_rel_pos_bias(np.asarray(value), size, method=method))
    return out


register_loader("timm", MaxViT, load_timm_maxvit)
for _size in ("tiny", "small", "base", "large"):
    for _res in (224, 384, 512):
        register_checkpoint("timm", f"maxvit_{_size}_tf_{_res}", f"maxvit_{_size}", img_size=_res)
