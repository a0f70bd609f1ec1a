"""MaxViT (Tu et al. 2022): stem, four stages of MaxViT blocks (MBConv -> block attention -> grid attention), and a
norm + MLP head. Faithful to timm's `maxvit_*_tf_*` (TensorFlow-compatible) models; see `variants.py` for sizes.

Valid image sizes: the stem and each of the four stages halve the resolution, so height and width must be
multiples of 32, and the last stage's size (`H/32`, `W/32`) must be a multiple of both the window and the grid
size (then every earlier stage is too). By default `window_size = grid_size = img_size // 32` (timm's
`partition_ratio` rule: 7 at 224 px, 12 at 384, 16 at 512, 2 at 64). Other sizes raise a `ValueError`; unlike
timm, inputs a few pixels short of a valid size are refused instead of being padded by the "SAME" convs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.core import validation
from jaxattn.models.features import Backbone, FeatureSpec
from jaxattn.models.layers import axes, drop_path_rates, precision
from jaxattn.models.layers import remat as remat_lib
from jaxattn.models.layers.dense import Dense
from jaxattn.models.layers.stack import Stack
from jaxattn.models.maxvit.attention import IMAGE, PartitionAttention, _pair, layer_norm
from jaxattn.models.maxvit.conv import MBConv, Stem, mean_fp32

REDUCTION = 32  # stem /2, then four stride-2 stages


def check_image_size(name: str, hw, window, grid) -> None:
    """Raises `ValueError` unless `hw` is a multiple of 32 whose `/32` is a multiple of `window` and `grid`."""
    h, w = hw
    if h % REDUCTION or w % REDUCTION:
        raise ValueError(f"`{name}` {(h, w)}: MaxViT needs height and width that are multiples of {REDUCTION} "
                         f"(stem and 4 stages each halve the resolution)")
    last = (h // REDUCTION, w // REDUCTION)
    for what, size in (("window_size", window), ("grid_size", grid)):
        if last[0] % size[0] or last[1] % size[1]:
            raise ValueError(f"`{name}` {(h, w)}: the last stage is {last[0]}x{last[1]}, which `{what}` {size} "
                             f"does not divide; valid sizes are multiples of {REDUCTION} x {what} "
                             f"(e.g. {REDUCTION * size[0]}x{REDUCTION * size[1]})")


class MaxViTBlock(nnx.Module):
    """MBConv (strided in a stage's first block) -> block attention + FFN -> grid attention + FFN."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int, window_size, grid_size, head_dim: int,
                 drop_path: float, conv_kwargs: dict, attn_kwargs: dict, rngs: nnx.Rngs):
        self.conv = MBConv(in_chs, out_chs, stride=stride, drop_path=drop_path, rngs=rngs, **conv_kwargs)
        self.attn_block = PartitionAttention(out_chs, partition="block", size=window_size, head_dim=head_dim,
                                             drop_path=drop_path, rngs=rngs, **attn_kwargs)
        self.attn_grid = PartitionAttention(out_chs, partition="grid", size=grid_size, head_dim=head_dim,
                                            drop_path=drop_path, rngs=rngs, **attn_kwargs)

    def __call__(self, x):
        return self.attn_grid(self.attn_block(self.conv(axes.constrain(x, IMAGE))))


def checkpointed(module: nnx.Module, x, remat: str):
    """`module(x)` under the remat policy `remat`, the module's non-parameter updates (BatchNorm statistics, RNG
    counts) written back: what a `Stack` does for its blocks, for a block outside one."""
    if remat == "none":
        return module(x)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def step(params, rest, x):
        block = nnx.merge(graphdef, params, rest)
        return block(x), nnx.state(block, nnx.Not(nnx.Param))
    y, rest = remat_lib.checkpoint(step, remat)(params, rest, x)
    if jax.tree.leaves(rest):
        nnx.update(module, rest)
    return y


class MaxViTStage(nnx.Module):
    """A stage: its first block (`first`: strided, changes the width), then `rest`, the `depth - 1` identical
    blocks in a `Stack` (None when `depth` is 1), scanned when `scan`. Every block runs under `remat`.
    `rates`: the `depth` blocks' stochastic-depth rates."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, rates, *, scan: bool, remat: str, rngs: nnx.Rngs,
                 **block_kwargs):
        self.remat = remat_lib.check_remat(remat)
        self.first = MaxViTBlock(in_chs, out_chs, stride=2, drop_path=rates[0], rngs=rngs, **block_kwargs)
        rest_rates = tuple(rates[1:])

        def make_block(rngs, rate):
            return MaxViTBlock(out_chs, out_chs, stride=1, drop_path=rate, rngs=rngs, **block_kwargs)
        # All-zero rates stay a Python float: no per-block rate variable, no random draws.
        if any(rest_rates):
            factory, block_args = make_block, (rest_rates,)
        else:
            factory, block_args = (lambda rngs: make_block(rngs, 0.0)), ()
        self.rest = (Stack(factory, depth - 1, rngs=rngs, scan=scan, remat=remat, block_args=block_args)
                     if depth > 1 else None)

    def __call__(self, x):
        x = checkpointed(self.first, x, self.remat)
        return x if self.rest is None else self.rest(x)


class NormMlpHead(nnx.Module):
    """Global average pool -> LayerNorm -> Dense(hidden) + tanh (pre-logits) -> dropout -> Dense(classes).
    With `num_classes=0` there is no classifier and the pre-logits come out (timm's `num_classes=0`)."""

    def __init__(self, dim: int, hidden: int, num_classes: int, *, drop_rate: float, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(dim, **kw)
        self.pre_logits = Dense(dim, hidden, names=(axes.EMBED, axes.MLP), **kw)
        self.drop = nnx.Dropout(drop_rate, rngs=rngs)
        # Logits leave the head in float32 whatever the compute dtype (the loss is float32).
        self.fc = (Dense(hidden, num_classes, names=(axes.MLP, axes.VOCAB), preferred_element_type=jnp.float32, **kw)
                   if num_classes else None)

    def __call__(self, x, *, pre_logits: bool = False):
        x = jnp.tanh(self.pre_logits(self.norm(mean_fp32(x, axis=(1, 2)))))
        return x if pre_logits or self.fc is None else self.fc(self.drop(x))


class MaxViT(Backbone, nnx.Module):
    """MaxViT image classifier: NHWC float images `[B, H, W, in_chans]` -> logits `[B, num_classes]`.

    Args:
      num_classes: classifier width.
      img_size: `s` or `(h, w)`; sets the default window/grid size (`img_size // 32`). Inputs of other sizes
        are accepted when they satisfy the same rule for this model's window and grid (see module docstring).
      in_chans: input channels.
      stem_width: the stem's two conv widths, `c` or `(c1, c2)`.
      embed_dim: the four stage widths.
      depths: blocks per stage.
      head_dim: attention head width (heads = stage width / head_dim).
      window_size, grid_size: block-attention window `p` and grid-attention grid `g` (int or pair); None ->
        `img_size // 32`; `grid_size` None -> `window_size`.
      head_hidden_size: pre-logits width (default: last stage width).
      drop_rate: dropout before the classifier. drop_path_rate: stochastic depth, linear in block index from 0
        (timm: every sub-block of block `i` shares rate `i / (n - 1) * drop_path_rate`).
      expand_ratio, se_ratio, mlp_ratio: MBConv expansion, SE reduction (of the output width), FFN expansion.
      bn_momentum: flax convention (0.99 == TF MaxViT's; PyTorch/timm momentum 0.1 is flax 0.9).
      attention_implementation, dw_implementation: forwarded to `jaxattn.block_attention`/`grid_attention` and
        `DepthwiseConv2d` (None: best for the platform).
      dtype, param_dtype: computation dtype (None: float32; 'bfloat16' runs matmuls and convolutions in bf16,
        norms, softmax statistics, pooling means and the logits in float32) and parameter storage dtype.
      remat: rematerialisation policy of every block (`models/layers/remat.POLICIES`).
      scan_blocks: each stage's blocks after its first (all alike) in a scanned `Stack` (one block compiled per
        stage, parameters stacked on a leading `layers` axis); False unrolls them (`stages.<s>.rest.blocks.<i>`).
        `convert.to_unrolled` / `to_scanned` map parameter trees between the two.

    `model.train()` / `model.eval()` switch BatchNorm statistics, stochastic depth and dropout.

    As a backbone (`jaxattn.models.features`): features are timm's, stem first: `stem` (stride 2), then
    `stages.0` .. `stages.3` (strides 4 .. 32). The final norm is the head's, so `norm=True` changes nothing.

    Parameters: `stages.<s>.first` is timm's `stages.<s>.blocks.0`; `stages.<s>.rest.blocks` holds blocks 1..
    (stacked when scanned). Every parameter names its dims (`models/layers/axes.py`): heads and MLP / MBConv
    hidden units split over `tensor`, weights' widths over `fsdp`.
    """
    head_attr = ("head", "head.")

    def __init__(self, *, num_classes: int = 1000, img_size=224, in_chans: int = 3, stem_width=64,
                 embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2), head_dim: int = 32, window_size=None,
                 grid_size=None, head_hidden_size: int | None = None, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, expand_ratio: float = 4.0, se_ratio: float = 0.25,
                 mlp_ratio: float = 4.0, bn_momentum: float = 0.99, attention_implementation=None,
                 dw_implementation=None, dtype=None, param_dtype=jnp.float32, remat: str = "none",
                 scan_blocks: bool = True, rngs: nnx.Rngs):
        dtype = precision.check_dtype("dtype", dtype, allow_none=True)
        param_dtype = precision.check_dtype("param_dtype", param_dtype)
        self.remat, self.scan_blocks = remat_lib.check_remat(remat), bool(scan_blocks)
        self.img_size = _pair("img_size", img_size)
        embed_dim, depths = tuple(embed_dim), tuple(depths)
        if len(embed_dim) != len(depths) or not depths:
            raise ValueError(f"`embed_dim` {embed_dim} and `depths` {depths} must list the same stages")
        if len(depths) != 4:
            raise ValueError(f"MaxViT has 4 stages (the size rule assumes /32), got `depths` {depths}")
        for d in embed_dim:
            if d % head_dim:
                raise ValueError(f"every `embed_dim` {embed_dim} must be a multiple of `head_dim` {head_dim}")
        if window_size is None:
            if self.img_size[0] % REDUCTION or self.img_size[1] % REDUCTION:
                raise ValueError(f"`img_size` {self.img_size} must be a multiple of {REDUCTION} for MaxViT")
            window_size = (self.img_size[0] // REDUCTION, self.img_size[1] // REDUCTION)
        self.window_size = _pair("window_size", window_size)
        self.grid_size = self.window_size if grid_size is None else _pair("grid_size", grid_size)
        check_image_size("img_size", self.img_size, self.window_size, self.grid_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        stem_width = _pair("stem_width", stem_width)

        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.stem = Stem(in_chans, stem_width, bn_momentum=bn_momentum, rngs=rngs, **kw)
        conv_kwargs = dict(expand_ratio=expand_ratio, se_ratio=se_ratio, bn_momentum=bn_momentum,
                           dw_implementation=dw_implementation, **kw)
        attn_kwargs = dict(mlp_ratio=mlp_ratio, implementation=attention_implementation, **kw)
        rates = drop_path_rates(drop_path_rate, depths)
        stages, in_chs = [], stem_width[1]
        for out_chs, depth, stage_rates in zip(embed_dim, depths, rates):
            stages.append(MaxViTStage(in_chs, out_chs, depth, stage_rates, scan=self.scan_blocks, remat=self.remat,
                                      window_size=self.window_size, grid_size=self.grid_size, head_dim=head_dim,
                                      conv_kwargs=conv_kwargs, attn_kwargs=attn_kwargs, rngs=rngs))
            in_chs = out_chs
        self.stages = nnx.List(stages)
        self.feature_specs = (FeatureSpec(stem_width[1], 2, "stem", 0),) + tuple(
            FeatureSpec(c, 2 ** (i + 2), f"stages.{i}", i + 1) for i, c in enumerate(embed_dim))
        self.head = NormMlpHead(embed_dim[-1], head_hidden_size or embed_dim[-1], num_classes,
                                drop_rate=drop_rate, rngs=rngs, **kw)

    def check_images(self, images) -> None:
        """`ValueError` unless `images` is NHWC float with `in_chans` channels and a size the model fits."""
        validation.check_rank("images", images, 4, "[batch, height, width, channels] (NHWC)")
        validation.check_floating("images", images)
        if images.shape[-1] != self.in_chans:
            raise ValueError(f"`images` must have {self.in_chans} channels (NHWC), got shape {tuple(images.shape)}")
        check_image_size("images", images.shape[1:3], self.window_size, self.grid_size)

    def forward_features(self, images):
        """`[B, H, W, in_chans]` -> last-stage features `[B, H/32, W/32, embed_dim[-1]]`."""
        images = jnp.asarray(images)
        self.check_images(images)
        x = axes.constrain(self.stem(images), IMAGE)
        for stage in self.stages:
            x = stage(x)
        return x

    def __call__(self, images, *, pre_logits: bool = False):
        return self.head(self.forward_features(images), pre_logits=pre_logits)

    def _taps(self):
        def run(stage):
            def tap(x):
                x = stage(x)
                return x, x
            return tap
        return [lambda x: (axes.constrain(self.stem(x), IMAGE),) * 2] + [run(stage) for stage in self.stages]

    def _prune(self, num_taps: int) -> list[str]:
        removed = [f"stages.{i}." for i in range(num_taps - 1, len(self.stages))]
        self.stages = nnx.List(list(self.stages)[:num_taps - 1])
        return removed
