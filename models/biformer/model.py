"""BiFormer (Zhu et al., CVPR 2023): a hierarchical vision transformer with bi-level routing attention (BRA).

Layout and names follow rayleizhu/BiFormer `models/biformer.py` (+ `ops/bra_legacy.py`, `models/_common.py`) so
reference state dicts map one to one (see `convert.py`). Images are NHWC; tokens stay `[B, H, W, C]`:

    downsample_layers[0] (stem): conv 3x3 s2 (C/2) -> BN -> GELU -> conv 3x3 s2 (C) -> BN
    downsample_layers[i > 0]: conv 3x3 s2 -> BN
    stages[i][j]: x + dwconv3x3(x); x + DropPath(attn(LN(x))); x + DropPath(MLP(LN(x)))     (pre-norm, eps 1e-6)
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

import jax
import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn.core import validation
from jaxattn.models.features import Backbone, FeatureSpec
from jaxattn.models.layers import DepthwiseConv2d, DropPath, drop_path_rates

LN_EPS = 1e-6  # the reference's LayerNorm ("important to avoid attention collapsing")
BN_EPS, BN_MOMENTUM = 1e-5, 0.9  # torch BatchNorm2d defaults (torch momentum 0.1 == flax 0.9)
_trunc02 = nnx.initializers.truncated_normal(0.02)


def _linear(d_in, d_out, *, use_bias=True, dtype=None, rngs):
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=_trunc02, dtype=dtype, rngs=rngs)


def _batch_norm(dim, *, dtype=None, rngs):
    return nnx.BatchNorm(dim, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, rngs=rngs)


def _conv3x3_s2(d_in, d_out, *, dtype=None, rngs):
    return nnx.Conv(d_in, d_out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch nn.GELU


class Stem(nnx.Module):
    """`[B, H, W, in_chans] -> [B, ceil(H/4), ceil(W/4), dim]`."""

    def __init__(self, in_chans: int, dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv1 = _conv3x3_s2(in_chans, dim // 2, dtype=dtype, rngs=rngs)
        self.bn1 = _batch_norm(dim // 2, dtype=dtype, rngs=rngs)
        self.conv2 = _conv3x3_s2(dim // 2, dim, dtype=dtype, rngs=rngs)
        self.bn2 = _batch_norm(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.conv2(_gelu(self.bn1(self.conv1(x)))))


class Downsample(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv = _conv3x3_s2(d_in, d_out, dtype=dtype, rngs=rngs)
        self.bn = _batch_norm(d_out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


def _pad_to_multiple(x, multiple: int):
    h, w = x.shape[1:3]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return x


class BiLevelRoutingAttention(nnx.Module):
    """BRA block attention (`kv_downsample_mode='identity'`, hard non-differentiable routing, `param_attention
    ='qkvo'`). `[B, H, W, dim] -> [B, H, W, dim]`; `num_heads` heads of `qk_dim / num_heads` (q, k) and
    `dim / num_heads` (v) channels."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, *, qk_dim: int | None = None,
                 qk_scale: float | None = None, side_dwconv: int = 5, auto_pad: bool = False,
                 implementation: str | None = None, dtype=None, rngs: nnx.Rngs):
        self.dim, self.qk_dim = dim, qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"`qk_dim` ({self.qk_dim}) and `dim` ({dim}) must be divisible by `num_heads` "
                             f"({num_heads})")
        self.num_heads, self.n_win, self.topk = num_heads, n_win, topk
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.auto_pad, self.implementation = auto_pad, implementation
        self.qkv = _linear(dim, 2 * self.qk_dim + dim, dtype=dtype, rngs=rngs)
        self.wo = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.lepe = (DepthwiseConv2d(dim, side_dwconv, padding=side_dwconv // 2, rngs=rngs) if side_dwconv > 0
                     else nnx.data(None))

    def __call__(self, x):
        b, h, w, _ = x.shape
        if self.auto_pad:
            x = _pad_to_multiple(x, self.n_win)
        hp, wp = x.shape[1:3]
        qkv = self.qkv(x)
        n, qk = self.num_heads, self.qk_dim
        q = qkv[..., :qk].reshape(b, hp, wp, n, qk // n)
        k = qkv[..., qk:2 * qk].reshape(b, hp, wp, n, qk // n)
        v = qkv[..., 2 * qk:]
        out = jaxattn.bilevel_routing_attention(q, k, v.reshape(b, hp, wp, n, self.dim // n), self.n_win,
                                                self.topk, scale=self.scale, implementation=self.implementation)
        out = out.reshape(b, hp, wp, self.dim)
        if self.lepe is not None:
            out = out + self.lepe(v)  # LCE on v at full resolution
        return self.wo(out)[:, :h, :w]


class AttentionLePE(nnx.Module):
    """Global multi-head attention (`_common.Attention` / `AttentionLePE`): qkv Linear without bias, scale
    `(dim / num_heads) ** -0.5`, plus a depthwise conv of the attention input (LePE) when `side_dwconv > 0`."""

    def __init__(self, dim: int, *, num_heads: int = 8, side_dwconv: int = 5, implementation: str | None = None,
                 dtype=None, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by the global attention's {num_heads} heads")
        self.num_heads, self.implementation = num_heads, implementation
        self.qkv = _linear(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.lepe = (DepthwiseConv2d(dim, side_dwconv, padding=side_dwconv // 2, rngs=rngs) if side_dwconv > 0
                     else nnx.data(None))

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        out = jaxattn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                            implementation=self.implementation).reshape(b, h, w, c)
        if self.lepe is not None:
            out = out + self.lepe(x)
        return self.proj(out)


class Block(nnx.Module):
    def __init__(self, dim: int, *, num_heads: int, n_win: int, topk: int, qk_dim: int, mlp_ratio: float,
                 drop_path: float = 0.0, layer_scale: float | None = None, side_dwconv: int = 5,
                 before_attn_dwconv: int = 3, pre_norm: bool = True, qk_scale: float | None = None,
                 auto_pad: bool = False, implementation: str | None = None, dtype=None, rngs: nnx.Rngs):
        if before_attn_dwconv not in (0, 3):
            raise ValueError(f"`before_attn_dwconv` must be 3 or 0 (the reference pads it by 1), "
                             f"got {before_attn_dwconv}")
        self.pos_embed = (DepthwiseConv2d(dim, 3, padding=1, rngs=rngs) if before_attn_dwconv
                          else nnx.data(None))
        self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, topk, qk_dim=qk_dim, qk_scale=qk_scale,
                                                side_dwconv=side_dwconv, auto_pad=auto_pad,
                                                implementation=implementation, dtype=dtype, rngs=rngs)
        elif topk in (-1, -2):
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv if topk == -2 else 0, dtype=dtype, rngs=rngs)
        else:
            raise ValueError(f"`topks` entries must be > 0 (routing), -1 (global attention) or -2 (global "
                             f"attention with LePE), got {topk}")
        self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        hidden = int(mlp_ratio * dim)
        self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.pre_norm = pre_norm
        if layer_scale is not None:
            self.gamma1 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
            self.gamma2 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
        else:
            self.gamma1 = self.gamma2 = nnx.data(None)

    def _scaled(self, gamma, y):
        return y if gamma is None else y * gamma[...].astype(y.dtype)

    def __call__(self, x):
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        mlp = lambda t: self.fc2(_gelu(self.fc1(t)))
        if self.pre_norm:
            x = x + self.drop_path(self._scaled(self.gamma1, self.attn(self.norm1(x))))
            return x + self.drop_path(self._scaled(self.gamma2, mlp(self.norm2(x))))
        x = self.norm1(x + self.drop_path(self._scaled(self.gamma1, self.attn(x))))
        return self.norm2(x + self.drop_path(self._scaled(self.gamma2, mlp(x))))


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
                 dtype=None, rngs: nnx.Rngs):
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
        self.topks, self.auto_pad = topks, auto_pad

        self.downsample_layers = nnx.List(
            [Stem(in_chans, embed_dims[0], dtype=dtype, rngs=rngs)]
            + [Downsample(embed_dims[i], embed_dims[i + 1], dtype=dtype, rngs=rngs) for i in range(stages - 1)])
        rates = drop_path_rates(drop_path_rate, depths)
        self.stages = nnx.List([
            nnx.List([Block(embed_dims[i], num_heads=qk_dims[i] // head_dim if topks[i] > 0 else 8, n_win=n_win,
                            topk=topks[i], qk_dim=qk_dims[i], mlp_ratio=mlp_ratios[i], drop_path=rates[i][j],
                            layer_scale=layer_scale, side_dwconv=side_dwconv,
                            before_attn_dwconv=before_attn_dwconv, pre_norm=pre_norm, qk_scale=qk_scale,
                            auto_pad=auto_pad, implementation=implementation, dtype=dtype, rngs=rngs)
                      for j in range(depths[i])])
            for i in range(stages)])
        self.norm = _batch_norm(embed_dims[-1], dtype=dtype, rngs=rngs)
        self.head = (_linear(embed_dims[-1], num_classes, dtype=dtype, rngs=rngs) if num_classes > 0
                     else nnx.data(None))
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
        for down, blocks in zip(self.downsample_layers, self.stages):
            x = down(x)
            for block in blocks:
                x = block(x)
        return self.norm(x).mean(axis=(1, 2))

    def _taps(self):
        def run(down, blocks):
            def tap(x):
                x = down(x)
                for block in blocks:
                    x = block(x)
                return x, x
            return tap
        return [run(down, blocks) for down, blocks in zip(self.downsample_layers, self.stages)]

    def _prune(self, num_taps: int) -> list[str]:
        removed = [p for i in range(num_taps, len(self.stages)) for p in (f"downsample_layers.{i}.", f"stages.{i}.")]
        self.downsample_layers = nnx.List(list(self.downsample_layers)[:num_taps])
        self.stages = nnx.List(list(self.stages)[:num_taps])
        self.topks = self.topks[:num_taps]
        return removed

    def __call__(self, x):
        x = self.forward_features(x)
        return x if self.head is None else self.head(x)
