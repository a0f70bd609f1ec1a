"""Imports timm for benchmarks, also where torchvision cannot load (benchmarks only, never tests or runtime).

timm imports torchvision at import time, for `FrozenBatchNorm2d` and its data transforms; none of the models
benchmarked here use either. On this project's CPU machines the only torchvision wheels are CUDA builds that fail
to load against the CPU torch, so `import timm` fails. `import_timm()` then retries with a placeholder
`torchvision` package: a module whose attributes are empty classes. Returns `(timm, note)`, or `(None, reason)`.
"""
from __future__ import annotations

import sys
import types

_STUBBED = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
            "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.datasets",
            "torchvision.models", "torchvision.models.feature_extraction", "torchvision.utils")


class _Placeholder(type):
    """A class whose missing attributes are further placeholder classes (`InterpolationMode.NEAREST`)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __hash__(cls):
        return id(cls)


def _module_attr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Placeholder(name, (), {})


def _install_placeholder_torchvision(torch) -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    for name in _STUBBED:
        module = types.ModuleType(name)
        module.__getattr__ = _module_attr
        module.__file__ = __file__
        sys.modules[name] = module
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, module)
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})


def import_timm():
    try:
        import torch
    except ImportError as e:
        return None, f"torch not installed ({e})"
    try:
        import timm
        return timm, f"timm {timm.__version__}, torch {torch.__version__}"
    except ImportError as e:
        if "torchvision" not in str(e) and "nms" not in str(e):
            return None, f"timm not importable ({e})"
    except RuntimeError as e:  # a torchvision built for another torch: "operator torchvision::nms does not exist"
        if "torchvision" not in str(e):
            return None, f"timm not importable ({e})"
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        del sys.modules[name]
    _install_placeholder_torchvision(torch)
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - report any failure as "no timm"
        return None, f"timm not importable even with a placeholder torchvision ({e})"
    return timm, f"timm {timm.__version__}, torch {torch.__version__} (placeholder torchvision)"
