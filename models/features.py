"""The vision models as backbones: timm's feature-index rules, `FeatureInfo`, and `FeatureModel`.

Every vision family offers `model.forward_intermediates(x, indices=None, norm=False, stop_early=False,
output_fmt='NHWC', intermediates_only=True)` (a list of feature maps, in forward order) and
`model.prune_intermediate_layers(indices, prune_norm=False, prune_head=True)`, with timm's semantics:

- `indices`: None = every feature; an int `n` = the last `n`; a sequence = those indices, negative ones counted
  from the end. Features come back in forward order, each once, whatever the order of `indices`.
- `norm=True` applies the family's final norm to the last feature when it is taken (a no-op where the final norm
  sits in the head, as in timm's MaxViT and HaloNet).
- `intermediates_only=False` returns `(final, intermediates)`: `final` is what the classifier head would pool.

`FeatureModel` (what `create_model(name, features_only=True, out_indices=...)` returns) prunes the layers its
features do not need (head, later stages, the final norm unless `norm=True`) and returns the selected features;
its `feature_info` describes them as timm's does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxattn.models import context_parallel as cp

OUTPUT_FORMATS = ("NHWC", "NCHW")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One feature a model can return: its channels, its stride from the input, the module that outputs it, and
    which of the model's taps (`forward_intermediates` steps) produces it."""
    num_chs: int
    reduction: int
    module: str
    tap: int


class FeatureInfo(list):
    """timm's `feature_info` for the selected features: a list of dicts with `num_chs`, `reduction`, `module` and
    `index` (the feature's index in the model's full list), plus timm's accessors. Unlike timm's `FeatureInfo`,
    indexing and iteration cover the selected features only (timm's index all of the model's)."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


def feature_info(specs: Sequence[FeatureSpec], indices: Sequence[int] | None = None) -> FeatureInfo:
    """`FeatureInfo` of `specs[i]` for `i` in `indices` (all when None)."""
    indices = range(len(specs)) if indices is None else indices
    return FeatureInfo(dict(num_chs=specs[i].num_chs, reduction=specs[i].reduction, module=specs[i].module,
                            index=i) for i in indices)


def take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: absolute indices to take, and the largest. `ValueError` naming `indices` when
    out of range."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"`indices` {indices} (the last n features) must be in 1..{num_features}")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            index = num_features + i if i < 0 else i
            if not 0 <= index < num_features:
                raise ValueError(f"`indices` {list(indices)}: {i} is out of range for {num_features} features "
                                 f"(0..{num_features - 1}, or negative from the end)")
            take.append(int(index))
        if not take:
            raise ValueError("`indices` must select at least one feature, got an empty sequence")
    return take, max(take)


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"`output_fmt` must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")


def forward_taps(x, taps: Sequence[Callable], specs: Sequence[FeatureSpec], indices, *, stop_early: bool,
                 output_fmt: str, last_norm: Callable | None = None):
    """Runs `taps` in order (`tap(x) -> (x, feature)`) and collects the features `indices` selects among `specs`.

    `last_norm` is applied to the feature of the last tap when it is taken. `stop_early` skips the taps after the
    last one needed. Returns `(x, features)`, `x` the output of the last tap run.
    """
    check_output_fmt(output_fmt)
    take, max_index = take_indices(len(specs), indices)
    wanted = {specs[i].tap for i in take}
    last = len(taps) - 1
    features = []
    for t, tap in enumerate(taps):
        if stop_early and t > specs[max_index].tap:
            break
        x, feature = tap(x)
        if t in wanted:
            if last_norm is not None and t == last:
                feature = last_norm(feature)
            features.append(feature if output_fmt == "NHWC" else jnp.transpose(feature, (0, 3, 1, 2)))
    return x, features


def available(specs: Sequence[FeatureSpec], num_taps: int) -> tuple[FeatureSpec, ...]:
    """The features a (possibly pruned) model with `num_taps` taps still produces."""
    return tuple(s for s in specs if s.tap < num_taps)


class Backbone:
    """The feature API of a vision model (a mixin of the family's `nnx.Module`). A family provides:

    - `feature_specs`: a tuple of `FeatureSpec`, every feature of the unpruned model, in forward order;
    - `_taps()`: the current (possibly pruned) model as steps `tap(x) -> (x, feature)`;
    - `check_images(x)`: the input checks of its forward pass;
    - `_prune(num_taps)`: drops the layers after the first `num_taps` taps, returning the reference state-dict
      prefixes of what it removed (they accumulate in `pruned_prefixes`, whose keys the loaders skip);
    - `norm_attr`, `head_attr`: `(attribute, state-dict prefix)` of the final norm that `norm=True` applies to the
      last feature and of the classifier head, or None.
    """
    norm_attr: tuple[str, str] | None = None
    head_attr: tuple[str, str] | None = None
    pruned_prefixes: tuple[str, ...] = ()

    @property
    def final_norm(self):
        return None if self.norm_attr is None else getattr(self, self.norm_attr[0])

    @property
    def feature_info(self) -> FeatureInfo:
        """Every feature of the model (before any pruning), as timm's `model.feature_info`."""
        return feature_info(self.feature_specs)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NHWC", intermediates_only: bool = True):
        """`x [B, H, W, C]` -> the features `indices` selects (a list of `[B, h, w, c]`, or `[B, c, h, w]` for
        `output_fmt='NCHW'`), or `(final, features)` with `intermediates_only=False`. See the module docstring."""
        return self._forward_intermediates(x, self._taps(), indices, norm=norm, stop_early=stop_early,
                                           output_fmt=output_fmt, intermediates_only=intermediates_only,
                                           final=self.final_norm)

    def _forward_intermediates(self, x, taps, indices, *, norm, stop_early, output_fmt, intermediates_only, final):
        """The features of `taps`; with `intermediates_only=False` also the last tap's output, through `final`
        (if not None) when the last tap ran."""
        self.check_images(x)
        specs = available(self.feature_specs, len(taps))
        last_norm = self.final_norm if norm else None
        x, features = forward_taps(x, taps, specs, indices, stop_early=stop_early, output_fmt=output_fmt,
                                   last_norm=last_norm)
        if intermediates_only:
            return features
        ran_all = not stop_early or specs[take_indices(len(specs), indices)[1]].tap == len(taps) - 1
        return (final(x) if ran_all and final is not None else x), features

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Removes, in place, what the features `indices` selects do not need (timm's method of the same name):
        the stages after the last one, the final norm if `prune_norm` or if the last stage goes, the classifier
        head if `prune_head` or if the last stage goes. Returns the absolute indices."""
        taps = self._taps()
        specs = available(self.feature_specs, len(taps))
        take, max_index = take_indices(len(specs), indices)
        keep = specs[max_index].tap + 1
        end = keep < len(taps)
        removed = list(self._prune(keep))
        # also when the model was built without a head: a classifier checkpoint's head keys are then skipped
        for drop, attr in ((prune_norm or end, self.norm_attr), (prune_head or end, self.head_attr)):
            if drop and attr is not None:
                setattr(self, attr[0], nnx.data(None))
                removed.append(attr[1])
        self.pruned_prefixes = tuple(self.pruned_prefixes) + tuple(removed)
        return take


def _shard_rows(feature, output_fmt: str, strategy: str | None):
    """Under context parallelism, a feature map whose rows split over the context axis is constrained to rows
    sharded over it (batch and the other dimensions as the compiler chooses); anything else is left alone."""
    n = cp.active(strategy)
    rows = 1 if output_fmt == "NHWC" else 2
    if not n or feature.shape[rows] % n:
        return feature
    spec = [P.UNCONSTRAINED] * feature.ndim
    spec[rows] = cp.CONTEXT_AXIS
    return jax.lax.with_sharding_constraint(feature, P(*spec))


class FeatureModel(nnx.Module):
    """A vision model as a backbone: `images [B, H, W, C]` -> the list of features `out_indices` selects.

    Args:
      model: a vision model with `forward_intermediates` / `prune_intermediate_layers` (it is pruned in place:
        the classifier head, the stages after the last selected feature, and the final norm unless `norm`).
      out_indices: None (every feature), an int n (the last n) or indices (negative from the end), as timm.
      norm: apply the final norm to the last feature (where the family has one).
      output_fmt: 'NHWC' (default) or 'NCHW'.

    `feature_info` lists the selected features (`num_chs`, `reduction`, `module`, `index`). Under context
    parallelism (the backbone built with `context_parallel='halo'` and a `'context'` mesh axis > 1), features whose
    rows split over the axis come back sharded by rows. Weights load with the `convert` functions as into the full
    model: the keys of pruned layers are skipped.
    """

    def __init__(self, model: nnx.Module, out_indices: int | Sequence[int] | None = None, *, norm: bool = False,
                 output_fmt: str = "NHWC"):
        check_output_fmt(output_fmt)
        take, _ = take_indices(len(model.feature_specs), out_indices)
        self.out_indices = tuple(sorted(set(take)))
        model.prune_intermediate_layers(list(self.out_indices), prune_norm=not norm, prune_head=True)
        self.model = model
        self.norm, self.output_fmt = norm, output_fmt

    @property
    def feature_info(self) -> FeatureInfo:
        return feature_info(self.model.feature_specs, self.out_indices)

    def __call__(self, images) -> list:
        features = self.model.forward_intermediates(images, indices=list(self.out_indices), norm=self.norm,
                                                    stop_early=True, output_fmt=self.output_fmt)
        strategy = getattr(self.model, "context_parallel", None)
        return [_shard_rows(f, self.output_fmt, strategy) for f in features]
