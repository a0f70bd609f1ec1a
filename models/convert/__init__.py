"""Weight import from reference checkpoints (PyTorch state dicts as name -> numpy array; no torch import).

- `load_timm(model, state_dict)`, `load_dinat(...)`, `load_biformer(...)`: fill an existing model, strictly.
- `from_timm(timm_name, state_dict)`, `from_dinat(name, ...)`, `from_biformer(name, ...)`: build the matching
  registered model, then load it.

Each family registers its loaders beside its model (`models/<family>/convert.py`) with `register_loader` and its
reference checkpoint names with `register_checkpoint`; this module only dispatches. See `common.StrictLoader`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from jaxattn.models import registry
from jaxattn.models.convert.common import StateDictError, StrictLoader, torch_conv, torch_linear

SOURCES = ("timm", "dinat", "biformer")
_LOADERS: dict[tuple[str, type], Callable] = {}
_CHECKPOINTS: dict[tuple[str, str], tuple[str, dict]] = {}


def register_loader(source: str, model_class: type, loader: Callable) -> None:
    """`loader(model, state_dict) -> model` fills `model_class` instances from `source` checkpoints."""
    _LOADERS[(source, model_class)] = loader


def register_checkpoint(source: str, checkpoint_name: str, model_name: str, **overrides) -> None:
    """A reference checkpoint name (e.g. timm's 'maxvit_tiny_tf_384') -> registered model + constructor overrides."""
    _CHECKPOINTS[(source, checkpoint_name)] = (model_name, overrides)


def checkpoint_names(source: str) -> list[str]:
    registry.list_models()  # imports every family, so their registrations are present
    return sorted(name for src, name in _CHECKPOINTS if src == source)


def load(source: str, model, state_dict: Mapping):
    registry.list_models()
    for klass in type(model).__mro__:
        if (source, klass) in _LOADERS:
            return _LOADERS[(source, klass)](model, state_dict)
    raise ValueError(f"no {source} loader for {type(model).__name__}")


def build(source: str, checkpoint_name: str, state_dict: Mapping, *, rngs=None, **overrides):
    registry.list_models()
    if (source, checkpoint_name) not in _CHECKPOINTS:
        raise ValueError(f"unknown {source} checkpoint {checkpoint_name!r}; known: {checkpoint_names(source)}")
    model_name, defaults = _CHECKPOINTS[(source, checkpoint_name)]
    kwargs = {**defaults, **overrides}
    num_classes = kwargs.pop("num_classes", None)
    if num_classes is None and registry.get_entry(model_name).kind == "vision":
        num_classes = _infer_num_classes(state_dict)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    model = registry.create_model(model_name, rngs=rngs, **extra, **kwargs)
    return load(source, model, state_dict)


def _infer_num_classes(state_dict) -> int | None:
    """Classifier width from the last 2-D weight whose name looks like a head (`head.fc.weight`, `head.weight`)."""
    heads = [k for k in state_dict if k.endswith(".weight") and ("head" in k or k.startswith("fc."))
             and getattr(state_dict[k], "ndim", 0) == 2]
    return int(state_dict[heads[-1]].shape[0]) if heads else None


def load_timm(model, state_dict):
    return load("timm", model, state_dict)


def load_dinat(model, state_dict):
    return load("dinat", model, state_dict)


def load_biformer(model, state_dict):
    return load("biformer", model, state_dict)


def from_timm(timm_name: str, state_dict, **overrides):
    return build("timm", timm_name, state_dict, **overrides)


def from_dinat(name: str, state_dict, **overrides):
    return build("dinat", name, state_dict, **overrides)


def from_biformer(name: str, state_dict, **overrides):
    return build("biformer", name, state_dict, **overrides)


__all__ = [
    "StateDictError", "StrictLoader", "torch_conv", "torch_linear", "register_loader", "register_checkpoint",
    "checkpoint_names", "load_timm", "load_dinat", "load_biformer", "from_timm", "from_dinat", "from_biformer",
]
