"""BiFormer (Zhu et al., CVPR 2023): a hierarchical vision transformer with bi-level routing attention (BRA).

Layout and names follow rayleizhu/BiFormer `models/biformer.py` (+ `ops/bra_legacy.py`, `models/_common.py`) so
reference state dicts map one to one (see `convert.py`; attention kernels keep heads as a dim of their own, see
`layers.py`). Images are NHWC; tokens stay `[B, H, W, C]`:

    downsample_layers[0] (stem): conv 3x3 s2 (C/2) -> BN -> GELU -> conv 3x3 s2 (C) -> BN
    downsample_layers[i > 0]: conv 3x3 s2 -> BN
    stages[i] (a `Stack` of blocks `j`, scanned or unrolled):
        x + dwconv3x3(x); x + DropPath(attn(LN(x))); x + DropPath(MLP(LN(x)))  (pre-norm, eps 1e-6)
        attn = BRA (topk > 0), global attention with LePE (topk = -2) or without (topk = -1)
    norm (BatchNorm) -> mean over H, W -> head (Linear)

BRA (`jaxattn.bilevel_routing_attention`): one Linear gives q, k (`qk_dim` each) and v (`dim`); routing over
`n_win x n_win` regions with scale `qk_dim ** -0.5` (the full width, a quirk of the released models), then a 5x5
depthwise conv of v (LCE) is added before the output Linear `wo`. Every routed stage's map must be a multiple of
`n_win` (224 px: 56, 28, 14 with n_win 7); `auto_pad=True` zero-pads right/bottom instead, as the reference's
segmentation option does (the padding enters the qkv Linear, region means and LCE, then is cropped).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxattn.core import validation
from jaxattn.models.features import Backbone, FeatureSpec
from jaxattn.models.layers import DropPath, axes, drop_path_rates, precision
from jaxattn.models.layers.remat import check_remat
from jaxattn.models.layers.stack import Stack

from .attention import IMAGE, AttentionLePE, BiLevelRoutingAttention
from .layers import batch_norm, conv3x3_s2, depthwise, gelu, layer_norm, linear

__all__ = ["AttentionLePE", "BiFormer", "BiLevelRoutingAttention", "Block"]
HIDDEN = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.MLP)


class Stem(nnx.Module):
    """`[B, H, W, in_chans] -> [B, ceil(H/4), ceil(W/4), dim]`."""

    def __init__(self, in_chans: int, dim: int, *, rngs: nnx.Rngs, **kw):
        self.conv1 = conv3x3_s2(in_chans, dim // 2, rngs=rngs, **kw)
        self.bn1 = batch_norm(dim // 2, rngs=rngs, **kw)
        self.conv2 = conv3x3_s2(dim // 2, dim, rngs=rngs, **kw)
        self.bn2 = batch_norm(dim, rngs=rngs, **kw)

    def __call__(self, x):
        return self.bn2(self.conv2(gelu(self.bn1(self.conv1(x)))))


class Downsample(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, **kw):
        self.conv = conv3x3_s2(d_in, d_out, rngs=rngs, **kw)
        self.bn = batch_norm(d_out, rngs=rngs, **kw)

    def __call__(self, x):
        return self.bn(self.conv(x))


class Block(nnx.Module):
    """`x + dwconv3x3(x); x + DropPath(attn(LN(x))); x + DropPath(MLP(LN(x)))` (pre-norm; post-norm moves the
    norms after the residual sums). `drop_path` may be a traced scalar (a scanned `Stack`'s per-block rate)."""

    def __init__(self, dim: int, *, num_heads: int, n_win: int, topk: int, qk_dim: int, mlp_ratio: float,
                 drop_path: float = 0.0, layer_scale: float | None = None, side_dwconv: int = 5,
                 before_attn_dwconv: int = 3, pre_norm: bool = True, qk_scale: float | None = None,
                 auto_pad: bool = False, implementation: str | None = None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if before_attn_dwconv not in (0, 3):
            raise ValueError(f"`before_attn_dwconv` must be 3 or 0 (the reference pads it by 1), "
                             f"got {before_attn_dwconv}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = (depthwise(dim, 3, param_dtype=param_dtype, rngs=rngs) if before_attn_dwconv
                          else nnx.data(None))
        self.norm1 = layer_norm(dim, **kw)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, topk, qk_dim=qk_dim, qk_scale=qk_scale,
                                                side_dwconv=side_dwconv, auto_pad=auto_pad,
                                                implementation=implementation, **kw)
        elif topk in (-1, -2):
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv if topk == -2 else 0, **kw)
        else:
            raise ValueError(f"`topks` entries must be > 0 (routing), -1 (global attention) or -2 (global "
                             f"attention with LePE), got {topk}")
        self.norm2 = layer_norm(dim, **kw)
        hidden = int(mlp_ratio * dim)
        self.fc1 = linear(dim, hidden, (axes.EMBED, axes.MLP), **kw)
        self.fc2 = linear(hidden, dim, (axes.MLP, axes.EMBED), **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.pre_norm = pre_norm
        if layer_scale is not None:
            gamma = lambda: nnx.Param(jnp.full((dim,), layer_scale, param_dtype), **axes.param_metadata((axes.NORM,)))
            self.gamma1, self.gamma2 = gamma(), gamma()
        else:
            self.gamma1 = self.gamma2 = nnx.data(None)

    def _scaled(self, gamma, y):
        return y if gamma is None else y * gamma[...].astype(y.dtype)

    def _mlp(self, x):
        return self.fc2(axes.constrain(gelu(self.fc1(x)), HIDDEN))

    def __call__(self, x):
        x = axes.constrain(x, IMAGE)
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        if self.pre_norm:
            x = x + self.drop_path(self._scaled(self.gamma1, self.attn(self.norm1(x))))
            x = x + self.drop_path(self._scaled(self.gamma2, self._mlp(self.norm2(x))))
        else:
            x = self.norm1(x + self.drop_path(self._scaled(self.gamma1, self.attn(x))))
            x = self.norm2(x + self.drop_path(self._scaled(self.gamma2, self._mlp(x))))
        return axes.constrain(x, IMAGE)


class BiFormer(Backbone, nnx.Module):
    """BiFormer. NHWC images `[B, H, W, in_chans]` -> logits `[B, num_classes]` (pooled features when
    `num_classes == 0`).

    Args:
      depths, embed_dims, mlp_ratios, qk_dims, topks: per stage (4 stages). `topks[i] > 0` routes to that many
        regions; -2 is global attention with LePE, -1 without. Heads per stage: `qk_dims[i] // head_dim`.
      n_win: regions per side for BRA. img_size: the input size the model is built for; without `auto_pad`
        every routed stage's map (`ceil(img_size / 2**(i+2))`) must be a multiple of `n_win`.
      side_dwconv: LCE/LePE kernel (5); before_attn_dwconv: the 3x3 depthwise conv before attention (0: none).
      layer_scale: per-channel residual gains' initial value (None: none, as in the released models).
      pre_norm: pre-norm blocks (True, released) or post-norm.
      drop_path_rate: stochastic depth, linear in block index from 0 (training mode only).
      implementation: passed to `jaxattn.bilevel_routing_attention` (None picks per platform).
      remat: the rematerialisation policy of every block (`models/layers/remat.POLICIES`).
      dtype, param_dtype: compute dtype (None: fp32) and parameter storage dtype (fp32); norms, softmax, the
        pooling mean and the logits stay fp32.
      scan_blocks: each stage's blocks stacked and run by one `lax.scan` (`stages.{i}.blocks.*` with a leading
        block axis); False unrolls them (`stages.{i}.blocks.{j}.*`, the reference's per-block layout).
        `convert.to_unrolled` / `from_unrolled` convert states between the two.

    As a backbone (`jaxattn.models.features`): one feature per stage, the output of `stages.{i}` (strides 4, 8, 16,
    32), as the official code's stages; `norm=True` applies the final BatchNorm to the last one.
    """
    norm_attr, head_attr = ("norm", "norm."), ("head", "head.")

    def __init__(self, *, depths: Sequence[int] = (2, 2, 8, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 mlp_ratios: Sequence[float] = (3, 3, 3, 3), qk_dims: Sequence[int] | None = None,
                 topks: Sequence[int] = (1, 4, 16, -2), head_dim: int = 32, n_win: int = 7, img_size: int = 224,
                 in_chans: int = 3, num_classes: int = 1000, side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 layer_scale: float | None = None, pre_norm: bool = True, qk_scale: float | None = None,
                 drop_path_rate: float = 0.0, auto_pad: bool = False, implementation: str | None = None,
                 remat: str = "none", dtype=None, param_dtype=jnp.float32, scan_blocks: bool = True,
                 rngs: nnx.Rngs):
        check_remat(remat)
        dtype = precision.check_dtype("dtype", dtype, allow_none=True)
        param_dtype = precision.check_dtype("param_dtype", param_dtype)
        depths, embed_dims = tuple(map(int, depths)), tuple(map(int, embed_dims))
        qk_dims = embed_dims if qk_dims is None else tuple(map(int, qk_dims))
        mlp_ratios, topks = tuple(mlp_ratios), tuple(map(int, topks))
        stages = len(depths)
        for name, value in (("embed_dims", embed_dims), ("mlp_ratios", mlp_ratios), ("qk_dims", qk_dims),
                            ("topks", topks)):
            if len(value) != stages:
                raise ValueError(f"`{name}` needs one entry per stage (depths {list(depths)}), got {list(value)}")
        if any(t == 0 or t < -2 for t in topks):
            raise ValueError(f"`topks` entries must be > 0 (routing), -1 (global attention) or -2 (global attention "
                             f"with LePE), got {list(topks)}")
        if before_attn_dwconv not in (0, 3):
            raise ValueError(f"`before_attn_dwconv` must be 3 or 0 (the reference pads it by 1), "
                             f"got {before_attn_dwconv}")
        for i, qk in enumerate(qk_dims):
            if topks[i] > 0 and (qk < head_dim or qk % head_dim):
                raise ValueError(f"stage {i}: `qk_dims[{i}]` ({qk}) must be a multiple of `head_dim` ({head_dim})")
        if not auto_pad:
            for i, topk in enumerate(topks):
                size = -(-img_size // 2 ** (i + 2))
                if topk > 0 and size % n_win:
                    raise ValueError(f"`img_size` {img_size} gives a {size}x{size} map in stage {i}, not a multiple "
                                     f"of `n_win` {n_win}; use a multiple of {n_win * 2 ** (i + 2)} px or "
                                     f"auto_pad=True")
        self.in_chans, self.num_classes, self.img_size, self.n_win = in_chans, num_classes, img_size, n_win
        self.topks, self.auto_pad, self.scan_blocks = topks, auto_pad, bool(scan_blocks)

        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.downsample_layers = nnx.List(
            [Stem(in_chans, embed_dims[0], rngs=rngs, **kw)]
            + [Downsample(embed_dims[i], embed_dims[i + 1], rngs=rngs, **kw) for i in range(stages - 1)])
        rates = drop_path_rates(drop_path_rate, depths)

        def stage(i):
            def make_block(rngs, *rate):  # (no default: nnx.vmap would map it)
                return Block(embed_dims[i], num_heads=qk_dims[i] // head_dim if topks[i] > 0 else 8, n_win=n_win,
                             topk=topks[i], qk_dim=qk_dims[i], mlp_ratio=mlp_ratios[i], drop_path=rate[0] if rate else 0.0,
                             layer_scale=layer_scale, side_dwconv=side_dwconv,
                             before_attn_dwconv=before_attn_dwconv, pre_norm=pre_norm, qk_scale=qk_scale,
                             auto_pad=auto_pad, implementation=implementation, rngs=rngs, **kw)
            block_args = (rates[i],) if any(rates[i]) else ()  # no per-block rate where none drops
            return Stack(make_block, depths[i], rngs=rngs, scan=scan_blocks, remat=remat, block_args=block_args)
        self.stages = nnx.List([stage(i) for i in range(stages)])
        self.norm = batch_norm(embed_dims[-1], rngs=rngs, **kw)
        # The classes play the vocabulary's part: `tensor` may split them; the logits leave in fp32.
        self.head = (linear(embed_dims[-1], num_classes, (axes.EMBED, axes.VOCAB), out_dtype=jnp.float32,
                            rngs=rngs, **kw) if num_classes > 0 else nnx.data(None))
        self.feature_specs = tuple(FeatureSpec(d, 4 * 2 ** i, f"stages.{i}", i) for i, d in enumerate(embed_dims))

    def check_images(self, x) -> None:
        """NHWC float images with `in_chans` channels; without `auto_pad`, every routed stage's map a multiple of
        `n_win`."""
        validation.check_rank("x", x, 4, "[batch, height, width, channels]")
        validation.check_floating("x", x)
        validation.check_dim("x", x, -1, self.in_chans, "channels", "`in_chans`")
        if not self.auto_pad:  # check every stage before computing anything
            for i, topk in enumerate(self.topks):
                size = tuple(-(-d // 2 ** (i + 2)) for d in x.shape[1:3])
                if topk > 0 and (size[0] % self.n_win or size[1] % self.n_win):
                    raise ValueError(f"`x` of shape {tuple(x.shape)} gives a {size[0]}x{size[1]} map in stage {i}, "
                                     f"not a multiple of `n_win` {self.n_win}; use images a multiple of "
                                     f"{self.n_win * 2 ** (i + 2)} px or build the model with auto_pad=True")

    def forward_features(self, x):
        """NHWC images -> pooled features `[B, embed_dims[-1]]` (after the final BatchNorm)."""
        self.check_images(x)
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x).astype(jnp.float32).mean(axis=(1, 2))

    def _taps(self):
        def run(down, stage):
            def tap(x):
                x = stage(down(x))
                return x, x
            return tap
        return [run(down, stage) for down, stage in zip(self.downsample_layers, self.stages)]

    def _prune(self, num_taps: int) -> list[str]:
        removed = [p for i in range(num_taps, len(self.stages)) for p in (f"downsample_layers.{i}.", f"stages.{i}.")]
        self.downsample_layers = nnx.List(list(self.downsample_layers)[:num_taps])
        self.stages = nnx.List(list(self.stages)[:num_taps])
        self.topks = self.topks[:num_taps]
        return removed

    def __call__(self, x):
        x = self.forward_features(x)
        return x if self.head is None else self.head(x)
