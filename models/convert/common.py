"""Strict loading of reference (PyTorch-layout) state dicts into NNX models, with no torch import.

`StrictLoader` hands out state-dict entries by key, converts layouts, checks shapes, and at `finish()` fails
unless every key was used (or explicitly ignored) and every parameter/statistic of the model was set. Errors name
the key and the shapes.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


class StateDictError(ValueError):
    """A reference state dict does not fit the model (missing, unused or mis-shaped keys)."""


def torch_linear(w):
    """`[out, in]` -> `[in, out]`."""
    return np.asarray(w).T


def torch_conv(w):
    """`[out, in, kh, kw]` -> `[kh, kw, in, out]` (also right for depthwise `[C, 1, kh, kw]` -> `[kh, kw, 1, C]`)."""
    return np.asarray(w).transpose(2, 3, 1, 0)


class StrictLoader:
    def __init__(self, model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, ignore: Iterable[str] = ()):
        self.model = model
        self.state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
        self.ignore = [re.compile(p) for p in ignore]
        self.used: set[str] = set()
        self.assigned: set[int] = set()

    # -- primitives ---------------------------------------------------------------------------------------------
    def take(self, key: str) -> np.ndarray:
        if key not in self.state_dict:
            raise StateDictError(f"the state dict does not fit {_model_name(self.model)}: it has no key {key!r}"
                                 f"{self._hint(key)}")
        self.used.add(key)
        return self.state_dict[key]

    def _hint(self, key: str) -> str:
        """What the state dict has instead of `key`: its keys under the same module, or, when nothing shares the
        key's top-level name, a sign of another model's checkpoint."""
        near = [k for k in self.state_dict if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]]
        if near:
            return f"; keys under that prefix: {near}"
        top = key.split(".", 1)[0]
        if not any(k.split(".", 1)[0] == top for k in self.state_dict):
            firsts = list(self.state_dict)[:3]
            return (f"; none of its {len(self.state_dict)} keys is under {top + '.'!r} (its first: {firsts}): a "
                    f"checkpoint of another model?")
        return ""

    def has(self, key: str) -> bool:
        return key in self.state_dict

    def set(self, variable: nnx.Variable, key: str, transform: Callable | None = None) -> None:
        value = self.take(key)
        if transform is not None:
            value = transform(value)
        value = np.asarray(value)
        current = variable[...]
        if tuple(value.shape) != tuple(current.shape):
            raise StateDictError(f"{key!r}: shape {tuple(value.shape)} after layout conversion does not match the "
                                 f"{type(self.model).__name__}'s {tuple(current.shape)} (a checkpoint of another "
                                 f"size or configuration?)")
        variable[...] = jnp.asarray(value, dtype=current.dtype)
        self.assigned.add(id(variable))

    # -- common layers ------------------------------------------------------------------------------------------
    def linear(self, module, prefix: str) -> None:
        """`nnx.Linear` from `prefix.weight [out, in]` (+ `prefix.bias`)."""
        self.set(module.kernel, f"{prefix}.weight", torch_linear)
        if getattr(module, "bias", None) is not None:
            self.set(module.bias, f"{prefix}.bias")

    def conv(self, module, prefix: str) -> None:
        """`nnx.Conv` or `DepthwiseConv2d` from `prefix.weight [out, in, kh, kw]` (+ `prefix.bias`)."""
        self.set(module.kernel, f"{prefix}.weight", torch_conv)
        if getattr(module, "bias", None) is not None:
            self.set(module.bias, f"{prefix}.bias")

    def batch_norm(self, module: nnx.BatchNorm, prefix: str) -> None:
        self.set(module.scale, f"{prefix}.weight")
        self.set(module.bias, f"{prefix}.bias")
        self.set(module.mean, f"{prefix}.running_mean")
        self.set(module.var, f"{prefix}.running_var")
        if self.has(f"{prefix}.num_batches_tracked"):
            self.take(f"{prefix}.num_batches_tracked")

    def layer_norm(self, module: nnx.LayerNorm, prefix: str) -> None:
        if getattr(module, "scale", None) is not None:
            self.set(module.scale, f"{prefix}.weight")
        if getattr(module, "bias", None) is not None:
            self.set(module.bias, f"{prefix}.bias")

    # -- the final check ----------------------------------------------------------------------------------------
    def finish(self) -> nnx.Module:
        unused = sorted(k for k in self.state_dict
                        if k not in self.used and not any(p.search(k) for p in self.ignore))
        missing = []
        for path, variable in nnx.iter_graph(self.model):
            if isinstance(variable, (nnx.Param, nnx.BatchStat)) and id(variable) not in self.assigned:
                missing.append(".".join(str(p) for p in path))
        problems = []
        if unused:
            problems.append(f"{len(unused)} state-dict keys were not used: {unused[:20]}")
        if missing:
            problems.append(f"{len(missing)} model variables were not set: {missing[:20]}")
        if problems:
            raise StateDictError("; ".join(problems))
        return self.model


def _model_name(model) -> str:
    """The model a loader fills, as errors name it (a per-block view of a model names the model)."""
    return getattr(model, "model_name", type(model).__name__)
