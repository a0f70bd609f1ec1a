"""Models looked up by name: `create_model(name, ...)` and `list_models()`.

Each family package under `models/` registers its variants with `@register(name, kind=...)` on a builder
`builder(*, rngs, **overrides) -> nnx.Module`. Family packages are discovered (every subpackage of `models` except the
shared ones), so adding a family needs no edit here.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable

from flax import nnx

_SHARED_SUBPACKAGES = {"layers", "convert", "registry", "generate"}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nnx.Module]
    kind: str  # "vision" (NHWC images -> logits) or "lm" (token ids -> logits)
    family: str
    doc: str


_REGISTRY: dict[str, ModelEntry] = {}
_discovered = False


def register(name: str, *, kind: str = "vision"):
    """Decorator registering `builder(*, rngs, **overrides)` under `name`."""
    if kind not in ("vision", "lm"):
        raise ValueError(f"`kind` must be 'vision' or 'lm', got {kind!r}")

    def wrap(builder):
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"model name {name!r} is registered twice")
        family = builder.__module__.split(".")[2] if builder.__module__.count(".") >= 2 else builder.__module__
        _REGISTRY[name] = ModelEntry(name, builder, kind, family, (builder.__doc__ or "").strip())
        return builder

    return wrap


def _discover():
    global _discovered
    if _discovered:
        return
    from jaxattn import models as package
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg and info.name not in _SHARED_SUBPACKAGES:
            importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def list_models(kind: str | None = None, family: str | None = None) -> list[str]:
    """Registered names, sorted; optionally only one kind ('vision', 'lm') or family."""
    _discover()
    return sorted(n for n, e in _REGISTRY.items()
                  if (kind is None or e.kind == kind) and (family is None or e.family == family))


def get_entry(name: str) -> ModelEntry:
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, *, num_classes: int = 1000, rngs: nnx.Rngs | None = None, features_only: bool = False,
                 out_indices=None, feature_cfg: dict | None = None, **overrides) -> nnx.Module:
    """Builds the registered model `name`.

    Vision models get `num_classes`; language models take their vocabulary from `overrides` (`vocab_size=`).
    `overrides` change any constructor argument (e.g. `img_size=`, `depths=`, `drop_path_rate=`), which is how
    reduced configurations and reference checkpoints with other settings are expressed.

    `features_only=True` (vision models) returns the model as a backbone, a `features.FeatureModel` whose call
    gives the features `out_indices` selects (None: all; an int n: the last n; indices, negative from the end, as
    timm) and whose `feature_info` describes them; `num_classes` does not apply. `feature_cfg` may set `norm`
    (the final norm on the last feature) and `output_fmt` ('NHWC' or 'NCHW').
    """
    entry = get_entry(name)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if not features_only and (out_indices is not None or feature_cfg):
        raise ValueError("`out_indices` and `feature_cfg` apply to feature models only: pass features_only=True")
    if features_only:
        if entry.kind != "vision":
            raise ValueError(f"`features_only` applies to vision models; {name!r} is a language model")
        from jaxattn.models.features import FeatureModel
        feature_cfg = dict(feature_cfg or {})
        unknown = set(feature_cfg) - {"norm", "output_fmt"}
        if unknown:
            raise ValueError(f"`feature_cfg` takes 'norm' and 'output_fmt', got {sorted(unknown)}")
        model = entry.builder(rngs=rngs, num_classes=0, **overrides)  # no head to build and prune
        return FeatureModel(model, out_indices, **feature_cfg)
    if entry.kind == "vision":
        overrides["num_classes"] = num_classes
    elif num_classes != 1000:
        raise ValueError(f"`num_classes` does not apply to language model {name!r}; use `vocab_size=`")
    return entry.builder(rngs=rngs, **overrides)
