"""Weight import from reference checkpoints (PyTorch state dicts as name -> numpy array; no torch import).

- `load_timm(model, state_dict)`, `load_dinat(...)`, `load_biformer(...)`: fill an existing model, strictly.
- `from_timm(timm_name, state_dict)`, `from_dinat(name, ...)`, `from_biformer(name, ...)`: build the matching
  registered model, then load it (`features_only=True, out_indices=...` build the backbone instead).

`state_dict` is a mapping or a file path (`files.read_state_dict`): `.safetensors`, `.npz`, or a torch pickle
(`.pth`, `.bin`, ...) with `allow_pickle=True`, which imports torch. A backbone (`FeatureModel`, or any model after
`prune_intermediate_layers`) loads from the full model's checkpoint: the keys of its pruned layers are skipped.

Each family registers its loaders beside its model (`models/<family>/convert.py`) with `register_loader` and its
reference checkpoint names with `register_checkpoint`; this module only dispatches. See `common.StrictLoader`.
"""
from __future__ import annotations

from collections.abc import Callable

from jaxattn.models import registry
from jaxattn.models.convert.common import StateDictError, StrictLoader, torch_conv, torch_linear
from jaxattn.models.convert.files import read_state_dict
from jaxattn.models.features import FeatureModel

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


def load(source: str, model, state_dict, *, allow_pickle: bool = False):
    """Fills `model` (in place, strictly) from a `source` checkpoint: a mapping or a file path. Returns `model`."""
    registry.list_models()
    state_dict = read_state_dict(state_dict, allow_pickle=allow_pickle)
    target = model.model if isinstance(model, FeatureModel) else model
    pruned = tuple(getattr(target, "pruned_prefixes", ()))
    if pruned:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(pruned)}
    for klass in type(target).__mro__:
        if (source, klass) in _LOADERS:
            _LOADERS[(source, klass)](target, state_dict)
            return model
    raise ValueError(f"no {source} loader for {type(target).__name__}")


def build(source: str, checkpoint_name: str, state_dict, *, rngs=None, allow_pickle: bool = False, **overrides):
    registry.list_models()
    if (source, checkpoint_name) not in _CHECKPOINTS:
        raise ValueError(f"unknown {source} checkpoint {checkpoint_name!r}; known: {checkpoint_names(source)}")
    state_dict = read_state_dict(state_dict, allow_pickle=allow_pickle)
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


def load_timm(model, state_dict, *, allow_pickle: bool = False):
    return load("timm", model, state_dict, allow_pickle=allow_pickle)


def load_dinat(model, state_dict, *, allow_pickle: bool = False):
    return load("dinat", model, state_dict, allow_pickle=allow_pickle)


def load_biformer(model, state_dict, *, allow_pickle: bool = False):
    return load("biformer", model, state_dict, allow_pickle=allow_pickle)


def from_timm(timm_name: str, state_dict, **overrides):
    return build("timm", timm_name, state_dict, **overrides)


def from_dinat(name: str, state_dict, **overrides):
    return build("dinat", name, state_dict, **overrides)


def from_biformer(name: str, state_dict, **overrides):
    return build("biformer", name, state_dict, **overrides)


__all__ = [
    "StateDictError", "StrictLoader", "read_state_dict", "torch_conv", "torch_linear", "register_loader",
    "register_checkpoint", "checkpoint_names", "load_timm", "load_dinat", "load_biformer", "from_timm", "from_dinat", "from_biformer",
]
