"""Records the reference code's stage features for the five reduced fixtures -> `<fixture>_features.npz` here.

The fixtures in `../shared/fixtures` hold state dicts, inputs and logits only. This script rebuilds each reference
model with the fixture's reduced configuration (`__config__`), loads `sd/`, checks that it reproduces `__logits__`
(within 1e-4) and then records the features our `forward_intermediates` must match, for the first image:

- MaxViT, HaloNet-H1, HaloNet-26t: timm's `forward_intermediates(x)` (stem first), its `feature_info`, and the
  final output of `intermediates_only=False`. The MaxViT reference gets the fixture's perturbed one-hot lookups
  (`maxvit_reduced_timm_lookups.npz`, see `make_maxvit_fixture_lookups.py`), without which no faithful port
  reproduces the fixture logits.
- `timm_feature_info.json`: timm's `feature_info` of the full-size registered timm models we port (HaloNet
  stems with and without pool, final convs; MaxViT).
- DiNAT: the official detection/segmentation backbone (`detection/nat.py`): each level's output before its
  downsampler (`NATBlock.forward` returns it beside the downsampled map), with the per-output LayerNorms
  `norm{i}` replaced by identities so the raw taps come out; plus the classification model's final `norm` of the
  last tap. natten is not installable here, so `NeighborhoodAttention2D` is a brute-force torch stand-in with
  natten 0.14's semantics (below), written from the rules in `../shared/reference/ops.md`.
- BiFormer: the output of each `stages[i]` of `models/biformer.py` (forward hooks), plus the final `norm`.

Features are stored NHWC in float16 (a few MB in all): rounding costs at most 2^-11 of each value, which the tests
allow for on top of their 1e-4 comparison tolerance. `--fp32-dir DIR` also writes float32 copies (not committed).
Needs torch, timm (+ einops for BiFormer) and local checkouts of the two official repositories; none of them is a
dependency of this project, and their code is not copied here:

    python tests/models/data/make_fixture_features.py --nat PATH/Neighborhood-Attention-Transformer \
        --biformer PATH/BiFormer [--only maxvit,halonet,dinat,biformer] [--fp32-dir /tmp/features]
"""
import argparse
import importlib.util
import json
import os
import pathlib
import sys
import types

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
FIXTURES = pathlib.Path(os.environ.get("JAXATTN_FIXTURES", REPO.parent / "shared" / "fixtures"))  # as the tests
LOGITS_ATOL = 1e-4


def load_fixture(name):
    with np.load(FIXTURES / f"{name}.npz") as z:
        sd = {k[3:]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("sd/")}
        return sd, torch.from_numpy(z["__input__"]), z["__logits__"], json.loads(str(z["__config__"]))


def check_logits(name, model, images, logits):
    with torch.no_grad():
        ours = model(images).numpy()
    err = float(np.abs(ours - logits).max())
    if err > LOGITS_ATOL:
        raise SystemExit(f"{name}: the reference model is {err:.2e} from the fixture logits; not recording")
    print(f"{name}: reference reproduces __logits__ to {err:.1e}")


def save(name, features, args, **extra):
    """`features`: NCHW torch tensors of the first image. Saves `f{i}` NHWC float16 (+ extras as stored)."""
    arrays = {f"f{i}": f[0].permute(1, 2, 0).numpy() for i, f in enumerate(features)}
    for key, value in extra.items():
        arrays[key] = value.permute(1, 2, 0).numpy() if isinstance(value, torch.Tensor) else value
    for key, value in arrays.items():
        if value.dtype == np.float32 and not np.all(np.abs(value) < 6e4):
            raise SystemExit(f"{name}/{key}: values beyond float16 range")
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in arrays.items()}
    np.savez_compressed(HERE / f"{name}_features.npz", **half)
    if args.fp32_dir:
        pathlib.Path(args.fp32_dir).mkdir(parents=True, exist_ok=True)
        np.savez(pathlib.Path(args.fp32_dir) / f"{name}_features.npz", **arrays)
    shapes = [tuple(arrays[f"f{i}"].shape) for i in range(len(features))]
    print(f"{name}: saved {len(features)} features {shapes}")


def feature_info_json(info):
    return np.array(json.dumps([{k: fi[k] for k in ("num_chs", "reduction", "module")} for fi in info]))


# -- timm: MaxViT and HaloNet -----------------------------------------------------------------------------------
def import_timm():
    sys.path.insert(0, str(REPO))
    from benchmarks.timm_import import import_timm as importer
    sys.path.remove(str(REPO))  # this repository's `models` must not shadow BiFormer's
    timm, note = importer()
    if timm is None:
        raise SystemExit(note)
    print(note)
    return timm


def record_timm(name, model, args):
    sd, images, logits, _ = load_fixture(name)
    if name == "maxvit_reduced_timm":  # the fixture's perturbed non-persistent lookups
        with np.load(HERE / "maxvit_reduced_timm_lookups.npz") as z:
            lookups = {k: torch.from_numpy(z[k]) for k in z.files}
        model.load_state_dict(sd)
        for key, value in lookups.items():
            module, buffer = key.rsplit(".", 1)
            getattr(model.get_submodule(module), buffer).copy_(value)
    else:
        model.load_state_dict(sd)
    model.eval()
    check_logits(name, model, images, logits)
    with torch.no_grad():
        final, features = model.forward_intermediates(images[:1])
    save(name, features, args, final=final[0], feature_info=feature_info_json(model.feature_info))


def maxvit(timm, args):
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _tf_cfg
    c = load_fixture("maxvit_reduced_timm")[3]
    cfg = MaxxVitCfg(embed_dim=tuple(c["embed_dim"]), depths=tuple(c["depths"]), block_type=tuple(c["block_type"]),
                     stem_width=c["stem_width"], stem_bias=c["stem_bias"], head_hidden_size=c["head_hidden_size"],
                     **_tf_cfg())
    cfg.transformer_cfg.dim_head = c["head_dim"]
    model = MaxxVit(cfg, img_size=c["img_size"], num_classes=c["num_classes"])
    assert model.stages[0].blocks[0].attn_block.attn.rel_pos.window_size == (c["window"], c["window"])
    record_timm("maxvit_reduced_timm", model, args)


def halonet(timm, args):
    from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg, interleave_blocks

    def build(name, blocks, stem_type, halo_size):
        c = load_fixture(name)[3]
        cfg = ByoModelCfg(blocks=blocks, stem_chs=16, stem_type=stem_type, stem_pool="maxpool",
                          self_attn_layer="halo",
                          self_attn_kwargs=dict(block_size=c["block_size"], halo_size=halo_size,
                                                num_heads=c["num_heads"]))
        assert c["halo_size"] == halo_size
        return ByobNet(cfg, img_size=c["img_size"], num_classes=c["num_classes"])

    h1 = tuple(ByoBlockCfg(type="self_attn", d=d, c=ch, s=s, gs=0, br=1.0)
               for d, ch, s in zip((1, 1, 2, 1), (32, 32, 64, 64), (1, 2, 2, 2)))
    record_timm("halonet_h1_reduced_timm", build("halonet_h1_reduced_timm", h1, "7x7", 3), args)
    t26 = (ByoBlockCfg(type="bottle", d=1, c=64, s=1, gs=0, br=0.25),
           ByoBlockCfg(type="bottle", d=1, c=64, s=2, gs=0, br=0.25),
           interleave_blocks(types=("bottle", "self_attn"), d=2, c=128, s=2, gs=0, br=0.25),
           ByoBlockCfg(type="self_attn", d=1, c=128, s=2, gs=0, br=0.25))
    record_timm("halonet26t_reduced_timm", build("halonet26t_reduced_timm", t26, "tiered", 2), args)


TIMM_MODELS = ("maxvit_tiny_tf_224", "halonet_h1", "halonet26t", "halonet50ts", "sehalonet33ts")


def timm_feature_info(timm):
    infos = {}
    for name in TIMM_MODELS:
        model = timm.create_model(name, pretrained=False)
        infos[name] = [{k: fi[k] for k in ("num_chs", "reduction", "module")} for fi in model.feature_info]
    (HERE / "timm_feature_info.json").write_text(json.dumps(infos, indent=1) + "\n")
    print(f"saved the feature_info of {', '.join(TIMM_MODELS)}")


# -- DiNAT: the official repository with a natten 0.14 stand-in -------------------------------------------------------
def _axis_window(length, k, d):
    """`[L, L]` mask (key inside the query's window) and rpb index along one axis, natten 0.14 (ops.md): dilation
    groups by `i % d`; window start `clamp(i//d - k//2, 0, Lg - k)` in group coordinates; bias `m - i//d + k - 1`."""
    i = torch.arange(length)
    group, index = i % d, i // d
    group_len = (length - group + d - 1) // d
    start = torch.clamp(index - k // 2, min=0)
    start = torch.minimum(start, group_len - k)
    same = group[:, None] == group[None, :]
    key = index[None, :]
    mask = same & (key >= start[:, None]) & (key < start[:, None] + k)
    rel = torch.clamp(key - index[:, None] + k - 1, 0, 2 * k - 2)
    return mask, rel


class NeighborhoodAttention2D(torch.nn.Module):
    """natten 0.14's module (same constructor, parameter names and forward), attention by brute force."""

    def __init__(self, dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert bias, "the DiNAT fixture has a relative position bias"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size, self.dilation = kernel_size, dilation or 1
        self.window_size = self.kernel_size * self.dilation
        self.qkv = torch.nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = torch.nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.attn_drop = torch.nn.Dropout(attn_drop)
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(proj_drop)

    def forward(self, x):
        b, h0, w0, c = x.shape
        pad_r, pad_b = max(0, self.window_size - w0), max(0, self.window_size - h0)
        if pad_r or pad_b:  # natten 0.14: zero-pad right/bottom before qkv, crop after
            x = torch.nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # [b, n, h, w, d]
        mh, rh = _axis_window(h, self.kernel_size, self.dilation)
        mw, rw = _axis_window(w, self.kernel_size, self.dilation)
        logits = torch.einsum("bnijd,bnkld->bnijkl", q, k)
        bias = self.rpb[:, rh[:, None, :, None], rw[None, :, None, :]]  # [n, qy, qx, ky, kx]
        mask = mh[:, None, :, None] & mw[None, :, None, :]
        logits = (logits + bias[None]).masked_fill(~mask, float("-inf"))
        attn = logits.reshape(b, self.num_heads, h, w, h * w).softmax(-1).reshape(logits.shape)
        out = torch.einsum("bnijkl,bnkld->bnijd", self.attn_drop(attn), v)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)[:, :h0, :w0]
        return self.proj_drop(self.proj(out))


def _stub(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _import_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # timm's register_model looks the module up
    spec.loader.exec_module(module)
    return module


def dinat(args):
    root = pathlib.Path(args.nat)
    _stub("natten", NeighborhoodAttention2D=NeighborhoodAttention2D)  # no `context`: natten < 0.17 arguments
    registry = types.SimpleNamespace(register_module=lambda *a, **k: (lambda cls: cls))
    _stub("mmcv"), _stub("mmcv.runner", load_checkpoint=None)
    _stub("mmdet"), _stub("mmdet.utils", get_root_logger=None), _stub("mmdet.models")
    _stub("mmdet.models.builder", BACKBONES=registry)
    classification = _import_file("nat_classification", root / "classification" / "nat.py")
    detection = _import_file("nat_detection", root / "detection" / "nat.py")

    sd, images, logits, c = load_fixture("dinat_reduced_official")
    kwargs = dict(embed_dim=c["embed_dim"], mlp_ratio=c["mlp_ratio"], depths=c["depths"], num_heads=c["num_heads"],
                  drop_path_rate=c["drop_path_rate"], kernel_size=c["kernel_size"], dilations=c["dilations"])
    classifier = classification.NAT(num_classes=c["num_classes"], **kwargs)
    classifier.load_state_dict(sd)
    classifier.eval()
    check_logits("dinat_reduced_official", classifier, images, logits)

    backbone = detection.NAT(out_indices=tuple(range(len(c["depths"]))), **kwargs)
    for i in backbone.out_indices:
        setattr(backbone, f"norm{i}", torch.nn.Identity())  # the raw taps (norm{i} are new detection layers)
    backbone_sd = {k: v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
    backbone.load_state_dict(backbone_sd, strict=True)
    backbone.eval()
    with torch.no_grad():
        features = backbone(images[:1])
        last_normed = classifier.norm(features[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    save("dinat_reduced_official", features, args, normed_last=last_normed[0],
         modules=np.array(json.dumps([f"levels.{i}.blocks" for i in range(len(features))])))


# -- BiFormer: the official repository ------------------------------------------------------------------------------
def biformer(args):
    root = pathlib.Path(args.biformer)
    sys.path.insert(0, str(root))
    _stub("fairscale"), _stub("fairscale.nn"), _stub("fairscale.nn.checkpoint", checkpoint_wrapper=lambda m: m)
    from models.biformer import BiFormer

    sd, images, logits, c = load_fixture("biformer_reduced_official")
    keys = ("depth", "embed_dim", "mlp_ratios", "n_win", "kv_downsample_mode", "kv_per_wins", "topks",
            "side_dwconv", "before_attn_dwconv", "layer_scale_init_value", "qk_dims", "head_dim", "param_routing",
            "diff_routing", "soft_routing", "pre_norm", "pe", "num_classes")
    model = BiFormer(**{k: c[k] for k in keys})
    model.load_state_dict(sd)
    model.eval()
    check_logits("biformer_reduced_official", model, images, logits)
    features = []
    hooks = [stage.register_forward_hook(lambda m, i, o: features.append(o)) for stage in model.stages]
    with torch.no_grad():
        model.forward_features(images[:1])
        normed = model.norm(features[-1])
    for hook in hooks:
        hook.remove()
    save("biformer_reduced_official", features, args, normed_last=normed[0],
         modules=np.array(json.dumps([f"stages.{i}" for i in range(len(features))])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nat", help="checkout of SHI-Labs/Neighborhood-Attention-Transformer")
    parser.add_argument("--biformer", help="checkout of rayleizhu/BiFormer")
    parser.add_argument("--only", default="maxvit,halonet,dinat,biformer")
    parser.add_argument("--fp32-dir", help="also write float32 copies here")
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.manual_seed(0)
    timm = import_timm()  # the official repositories import timm too
    if "maxvit" in only:
        maxvit(timm, args)
    if "halonet" in only:
        halonet(timm, args)
    if only & {"maxvit", "halonet"}:
        timm_feature_info(timm)
    if "dinat" in only:
        if not args.nat:
            raise SystemExit("--nat PATH is needed for DiNAT")
        dinat(args)
    if "biformer" in only:
        if not args.biformer:
            raise SystemExit("--biformer PATH is needed for BiFormer")
        biformer(args)


if __name__ == "__main__":
    main()
