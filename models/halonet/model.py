"""HaloNet (Vaswani et al. 2021) as timm's `ByobNet`: stem, stages of bottleneck / halo self-attention blocks,
optional final 1x1 conv, global average pool and a linear classifier. NHWC images in, logits out.

The network is described by stages of `BlockCfg` (see `config.py`), so every timm `halonet*` configuration and
reduced versions of it are expressible. `model.train()` / `model.eval()` switch BatchNorm statistics, drop path and
the classifier dropout.

On pods (WORKSPACE "Pods"): every parameter names its dims; a stage's repeating blocks are scanned (`stage.py`);
`remat`, `dtype`, `param_dtype` as every family. Under `tensor` parallelism each residual block is Megatron-style:
the residual width (block inputs and outputs, shortcut convs, `(BATCH, HEIGHT, WIDTH, ACT_EMBED)`) and the first
1x1 conv's output (the input of the column-parallel layer) stay whole over `tensor` (`EMBED`: FSDP splits those
weights); the column-parallel layer (the 3x3 conv of a bottleneck, the q/kv projections of halo attention) splits
its output channels (`CONV_OUT`: hidden units, or whole heads); the last 1x1 conv is row-parallel (its input
channels `MLP`), so each block needs one all-reduce after it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import axes, precision
from jaxattn.models.layers.remat import check_remat

from jaxattn.core import validation
from jaxattn.models.features import Backbone, FeatureSpec
from jaxattn.models.halonet.config import AttnCfg, BlockCfg, make_divisible
from jaxattn.models.halonet.layers import BatchNorm, ConvBnAct, HaloAttention, SqueezeExcite, Stem, activation
from jaxattn.models.halonet.stage import Stage
from jaxattn.models.layers import DropPath, drop_path_rates

# Kernel names of a block's convs by their Megatron role (the module docstring); column-parallel convs use
# `conv.KERNEL_NAMES`.
WHOLE = (axes.CONV_KERNEL, axes.CONV_KERNEL, axes.CONV_IN, axes.EMBED)
ROW_PARALLEL = (axes.CONV_KERNEL, axes.CONV_KERNEL, axes.MLP, axes.EMBED)
IMAGE = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED)
HIDDEN = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.MLP)


def _shortcut(in_chs, out_chs, stride, precision_kw, rngs):
    """timm 'conv1x1' downsample: a strided 1x1 conv + BN when shape changes, identity otherwise."""
    if in_chs != out_chs or stride != 1:
        return ConvBnAct(in_chs, out_chs, 1, stride, act=None, names=WHOLE, **precision_kw, rngs=rngs)
    return None


class BottleneckBlock(nnx.Module):
    """timm `BottleneckBlock`: 1x1 -> 3x3 (stride) -> [SE] -> 1x1 (no act), drop path, + shortcut, act."""

    def __init__(self, in_chs: int, cfg: BlockCfg, *, act: str, se: bool, drop_path, zero_init_last: bool,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        mid = make_divisible(cfg.out_chs * cfg.bottle_ratio)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.shortcut = _shortcut(in_chs, cfg.out_chs, cfg.stride, kw, rngs)
        self.conv1_1x1 = ConvBnAct(in_chs, mid, 1, act=act, names=WHOLE, **kw, rngs=rngs)
        self.conv2_kxk = ConvBnAct(mid, mid, 3, cfg.stride, act=act, **kw, rngs=rngs)
        self.attn = SqueezeExcite(mid, **kw, rngs=rngs) if se else None
        self.conv3_1x1 = ConvBnAct(mid, cfg.out_chs, 1, act=None, zero_init=zero_init_last, names=ROW_PARALLEL,
                                   **kw, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.act_name = act

    def __call__(self, x):
        y = axes.constrain(self.conv2_kxk(self.conv1_1x1(x)), HIDDEN)
        if self.attn is not None:
            y = self.attn(y)
        y = self.drop_path(self.conv3_1x1(y))
        y = activation(self.act_name)(y + (x if self.shortcut is None else self.shortcut(x)))
        return axes.constrain(y, IMAGE)


class SelfAttnBlock(nnx.Module):
    """timm `SelfAttnBlock`: 1x1 -> halo attention (stride) -> BN + act (`post_attn`) -> 1x1 (no act), drop path,
    + shortcut, act. The attention output is `mid * value_ratio` wide (timm: `value_ratio = 1`)."""

    def __init__(self, in_chs: int, cfg: BlockCfg, *, act: str, attn: AttnCfg, drop_path, zero_init_last: bool,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        mid = make_divisible(cfg.out_chs * cfg.bottle_ratio)
        attn_out = mid if cfg.value_ratio == 1.0 else make_divisible(mid * cfg.value_ratio)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.shortcut = _shortcut(in_chs, cfg.out_chs, cfg.stride, kw, rngs)
        self.conv1_1x1 = ConvBnAct(in_chs, mid, 1, act=act, names=WHOLE, **kw, rngs=rngs)
        self.self_attn = HaloAttention(mid, attn_out, stride=cfg.stride, cfg=attn, **kw, rngs=rngs)
        self.post_attn = BatchNorm(attn_out, **kw, rngs=rngs)
        self.conv3_1x1 = ConvBnAct(attn_out, cfg.out_chs, 1, act=None, zero_init=zero_init_last,
                                   names=ROW_PARALLEL, **kw, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.act_name = act

    def __call__(self, x):
        act = activation(self.act_name)
        y = axes.constrain(act(self.post_attn(self.self_attn(self.conv1_1x1(x)))), HIDDEN)
        y = self.drop_path(self.conv3_1x1(y))
        return axes.constrain(act(y + (x if self.shortcut is None else self.shortcut(x))), IMAGE)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class HaloNet(Backbone, nnx.Module):
    """timm `ByobNet` restricted to what the `halonet*` models use.

    Args:
      stages: sequence of stages, each a sequence of `BlockCfg` (build them with `config.stage` / `interleave`).
      num_classes: classifier width; 0 returns pooled features.
      img_size: `int` or `(H, W)`: the training resolution. Every halo attention layer needs its input map
        divisible by its block size (timm asserts the same); a size that does not fit raises `ValueError` here and
        inputs are checked again at call time (any size that fits is accepted).
      stem_type, stem_chs, stem_pool: '7x7' | '3x3' | 'tiered', stem width, 3x3/2 max-pool after the stem.
      act: 'relu' or 'silu' everywhere (stem, blocks, post-attention BN).
      num_features: width of a final 1x1 conv-BN-act before pooling (0: none, timm's default).
      attn: model-wide `AttnCfg` (blocks may override it).
      se_bottleneck: squeeze-excite after the 3x3 of bottleneck blocks (timm `attn_layer='se'`).
      drop_rate: dropout before the classifier; drop_path_rate: stochastic depth, linear over all blocks.
      zero_init_last: zero-init the last BN scale of every residual branch (timm's default).
      attn_implementation: `jaxattn.halo_attention` backend for every block (overrides `AttnCfg.implementation`).
      remat: the rematerialisation policy of every block (`models/layers/remat.py`).
      dtype, param_dtype: compute dtype (None: the input's, float32 for float32 images) and parameter storage
        (`models/layers/precision.py`); BatchNorm, means and the logits stay float32.
      scan_blocks: scan each stage's repeating blocks (`stage.py`; False: unrolled, per-block names).

    As a backbone (`jaxattn.models.features`): timm's features, stem first: the stem's last conv before its final
    stride (`stem.conv1` of a 7x7 stem, `stem.conv3` of a tiered one), the last stage at each further stride, and
    `final_conv` (the last stage's output when there is no final conv) at the end. No final norm: `norm=True`
    changes nothing. `forward_intermediates(..., exclude_final_conv=True)` takes the last stage before `final_conv`.
    """
    head_attr = ("fc", "head.")

    def __init__(self, stages: Sequence[Sequence[BlockCfg]], *, num_classes: int = 1000, img_size=256,
                 in_chans: int = 3, stem_type: str = "7x7", stem_chs: int = 64, stem_pool: bool = True,
                 act: str = "relu", num_features: int = 0, attn: AttnCfg = AttnCfg(), se_bottleneck: bool = False,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, zero_init_last: bool = True,
                 attn_implementation: str | None = None, remat: str = "none", dtype=None,
                 param_dtype=jnp.float32, scan_blocks: bool = True, rngs: nnx.Rngs):
        activation(act)  # validates the name
        self.remat, self.scan_blocks = check_remat(remat), bool(scan_blocks)
        self.dtype = precision.check_dtype("dtype", dtype, allow_none=True)
        self.param_dtype = precision.check_dtype("param_dtype", param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.stage_cfgs = tuple(tuple(s) for s in stages)
        if not self.stage_cfgs or any(not s for s in self.stage_cfgs):
            raise ValueError(f"`stages` must be a non-empty sequence of non-empty stages, got {stages!r}")
        self.attn_cfg, self.in_chans = attn, in_chans
        self.kept_stages = len(self.stage_cfgs)  # fewer once pruned to a backbone
        self.img_size = _pair(img_size)
        self.stem = Stem(in_chans, stem_chs, stem_type, stem_pool, act=act, **kw, rngs=rngs)
        self.check_image_size(self.img_size, name="img_size")

        def make_block(cfg: BlockCfg, in_chs: int, rate, rngs: nnx.Rngs) -> nnx.Module:
            common = dict(act=act, drop_path=rate, zero_init_last=zero_init_last, **kw, rngs=rngs)
            if cfg.type == "bottle":
                return BottleneckBlock(in_chs, cfg, se=se_bottleneck, **common)
            block_attn = cfg.attn or attn
            if attn_implementation is not None:
                block_attn = dataclasses.replace(block_attn, implementation=attn_implementation)
            return SelfAttnBlock(in_chs, cfg, attn=block_attn, **common)

        rates = drop_path_rates(drop_path_rate, [len(s) for s in self.stage_cfgs])
        stage_modules, prev = [], stem_chs
        for stage_cfg, stage_rates in zip(self.stage_cfgs, rates):
            stage_modules.append(Stage(make_block, stage_cfg, prev, stage_rates, scan=self.scan_blocks,
                                       remat=self.remat, rngs=rngs))
            prev = stage_cfg[-1].out_chs
        self.stages = nnx.List(stage_modules)
        self.final_conv = ConvBnAct(prev, num_features, 1, act=act, **kw, rngs=rngs) if num_features else None
        self.num_features = num_features or prev
        self.head_drop = nnx.Dropout(drop_rate, rngs=rngs if drop_rate > 0 else None)
        # logits in float32 whatever `dtype` (bf16 operands, float32 accumulation and result)
        self.fc = (nnx.Linear(self.num_features, num_classes, **kw, preferred_element_type=jnp.float32,
                              kernel_init=axes.annotate(nnx.initializers.normal(0.01), (axes.EMBED, axes.VOCAB)),
                              bias_init=axes.annotate(nnx.initializers.zeros, (axes.VOCAB,)), rngs=rngs)
                   if num_classes else None)
        self.feature_specs = self._feature_specs()

    @property
    def context_parallel(self) -> str | None:
        return self.attn_cfg.context_parallel

    def _feature_specs(self) -> tuple[FeatureSpec, ...]:
        """timm `ByobNet.feature_info`: the stem's features but its output; the previous stage's output before each
        strided stage (the stem output before a strided first stage); `final_conv` at the last stage's stride."""
        stem = self.stem.features
        specs = [FeatureSpec(c, r, m, 0) for c, r, m in stem[:-1]]
        prev, reduction = FeatureSpec(*stem[-1], 0), stem[-1][1]
        for i, stage_cfg in enumerate(self.stage_cfgs):
            if stage_cfg[0].stride != 1:
                specs.append(prev)
            reduction *= stage_cfg[0].stride
            prev = FeatureSpec(stage_cfg[-1].out_chs, reduction, f"stages.{i}", i + 1)
        return tuple(specs) + (FeatureSpec(self.num_features, reduction, "final_conv", len(self.stage_cfgs)),)

    def attention_layers(self, size) -> list[tuple[str, tuple[int, int], int, int]]:
        """`(name, input map size, input stride, block size)` of every halo attention layer for an image `size`
        (sizes follow the convs' rounding: a stride-2 layer maps `n` to `ceil(n / 2)`)."""
        h, w = _pair(size)
        stride = 1
        for _ in range(self.stem.stride.bit_length() - 1):
            h, w, stride = -(-h // 2), -(-w // 2), stride * 2
        layers = []
        for i, stage_cfg in enumerate(self.stage_cfgs[:self.kept_stages]):
            for j, cfg in enumerate(stage_cfg):
                if cfg.type == "self_attn":
                    block = (cfg.attn or self.attn_cfg).block_size
                    layers.append((f"stages.{i}.{j}", (h, w), stride, block))
                if cfg.stride == 2:
                    h, w, stride = -(-h // 2), -(-w // 2), stride * 2
        return layers

    def check_image_size(self, size, *, name: str = "images") -> None:
        """`ValueError` naming the first halo attention layer whose input map is not a multiple of its block."""
        layers = self.attention_layers(size)
        need = math.lcm(*(stride * block for _, _, stride, block in layers)) if layers else 1
        for layer, (h, w), stride, block in layers:
            if h % block or w % block:
                raise ValueError(
                    f"`{name}` spatial size {_pair(size)} does not fit this HaloNet: halo attention in {layer} "
                    f"(block size {block}, total stride {stride}) gets a {h}x{w} map, not a multiple of {block}. "
                    f"Image sides must be multiples of block size x total stride ({need} here).")

    def check_images(self, images) -> None:
        """`ValueError` unless `images` is NHWC float with `in_chans` channels and a size the blocks fit."""
        if images.ndim != 4:
            raise ValueError(f"`images` must be NHWC (rank 4), got shape {tuple(images.shape)}")
        validation.check_floating("images", images)
        validation.check_dim("images", images, -1, self.in_chans, "channels", "`in_chans`")
        self.check_image_size(images.shape[1:3])

    def forward_features(self, x):
        x = axes.constrain(self.stem(x), IMAGE)
        for stage in self.stages:
            x = stage(x)
        return x if self.final_conv is None else self.final_conv(x)

    def __call__(self, images):
        """`images [B, H, W, in_chans]` (NHWC, float) -> logits `[B, num_classes]`."""
        self.check_images(images)
        x = jnp.mean(self.forward_features(images).astype(jnp.float32), axis=(1, 2))
        x = self.head_drop(x)
        return x if self.fc is None else self.fc(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NHWC", intermediates_only: bool = True,
                              exclude_final_conv: bool = False):
        """As `Backbone.forward_intermediates`; `exclude_final_conv=True` takes the last stage's output before
        `final_conv` (which then applies to `final` only), as timm."""
        return self._forward_intermediates(x, self._taps(final_conv=not exclude_final_conv), indices, norm=norm,
                                           stop_early=stop_early, output_fmt=output_fmt,
                                           intermediates_only=intermediates_only,
                                           final=self.final_conv if exclude_final_conv else None)

    def _taps(self, final_conv: bool = True):
        """The stem (its tapped conv as the feature), then each stage; the last stage ends with `final_conv`."""
        def run(i, stage):
            def tap(x):
                x = stage(x)
                if final_conv and self.final_conv is not None and i == len(self.stage_cfgs) - 1:
                    x = self.final_conv(x)
                return x, x
            return tap
        return [self.stem.forward_intermediates] + [run(i, stage) for i, stage in enumerate(self.stages)]

    def _prune(self, num_taps: int) -> list[str]:
        removed = [f"stages.{i}." for i in range(num_taps - 1, len(self.stages))]
        self.stages = nnx.List(list(self.stages)[:num_taps - 1])
        self.kept_stages = len(self.stages)
        if self.kept_stages < len(self.stage_cfgs) and self.final_conv is not None:
            self.final_conv = None
            removed.append("final_conv.")
        if num_taps == 1 and self.stem.tap_index is not None:
            removed += [f"stem.conv{i + 1}." for i in range(self.stem.tap_index + 1, len(self.stem.convs))]
            self.stem.prune_to_tap()
        return removed
