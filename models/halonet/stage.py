"""A HaloNet stage as first block + a `Stack` of the repeating blocks + a tail, and its per-block names.

A stage's first block differs from the others (stride, shortcut conv, input width). The blocks after it repeat
with a period found from their `BlockCfg`s: 1 for `stage(...)` ([attn, attn, ...]), 2 for `interleave(...)`
([bottle, attn, bottle, attn, ...]). One period is a `Cycle` of blocks; `Stack` holds `repeats` cycles (scanned
over stacked parameters, or unrolled); the blocks past the last whole period form the `tail`. Per-block drop-path
rates reach the cycles as `Stack(..., block_args=(rates,))`.

    block 0                         -> first
    block 1 + u * period + k        -> repeat.blocks[u].blocks[k]  (scanned: index u of the stacked arrays)
    block 1 + repeats * period + k  -> tail[k]

`stage_to_blocks` / `stage_from_blocks` convert a stage's pure state (`nnx.to_pure_dict`, parameters and batch
statistics) to `{j: block_state}` (timm's `stages.<i>.<j>` numbering) and back, in either layout.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from flax import nnx

from jaxattn.models.halonet.config import BlockCfg
from jaxattn.models.layers import remat as remat_lib
from jaxattn.models.layers.stack import Stack, blocks_to_stacked, stacked_to_blocks

# make_block(cfg, in_chs, drop_path_rate, rngs) -> block module
MakeBlock = Callable[[BlockCfg, int, object, nnx.Rngs], nnx.Module]


def find_period(cfgs: Sequence[BlockCfg]) -> int:
    """The smallest `p` with `cfgs[i] == cfgs[i - p]` for every `i >= p` (the sequence may end mid-period)."""
    return next(p for p in range(1, len(cfgs) + 1) if all(cfgs[i] == cfgs[i - p] for i in range(p, len(cfgs))))


class Cycle(nnx.Module):
    """One period of a stage's repeating blocks, applied in order (`rates`: their drop-path rates)."""

    def __init__(self, make_block: MakeBlock, cfgs: Sequence[BlockCfg], chs: int, rates, rngs: nnx.Rngs):
        self.blocks = nnx.List([make_block(cfg, chs, rates[k], rngs) for k, cfg in enumerate(cfgs)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _checkpointed(block: nnx.Module, x, policy: str):
    if policy == "none":
        return block(x)
    return nnx.remat(lambda b, y: b(y), policy=remat_lib.POLICIES[policy])(block, x)


class Stage(nnx.Module):
    """The blocks `cfgs` (drop-path `rates`, one per block) from `in_chs` channels; see the module docstring.
    Every block runs under the remat policy `remat`; `scan` scans the repeating cycles."""

    def __init__(self, make_block: MakeBlock, cfgs: Sequence[BlockCfg], in_chs: int, rates: Sequence[float], *,
                 scan: bool, remat: str, rngs: nnx.Rngs):
        self.remat = remat_lib.check_remat(remat)
        self.first = make_block(cfgs[0], in_chs, rates[0], rngs)
        rest, chs = tuple(cfgs[1:]), cfgs[0].out_chs
        self.period = find_period(rest) if rest else 1
        self.repeats = len(rest) // self.period
        self.repeat = nnx.data(None)
        if self.repeats:
            p, unit = self.period, rest[:self.period]
            unit_rates = [tuple(rates[1 + u * p:1 + (u + 1) * p]) for u in range(self.repeats)]
            if any(r for rs in unit_rates for r in rs):
                self.repeat = Stack(lambda r, rs: Cycle(make_block, unit, chs, rs, r), self.repeats, rngs=rngs,
                                    scan=scan, remat=self.remat, block_args=(unit_rates,))
            else:  # no drop path: static zero rates (no per-block rate variables, no random masks)
                self.repeat = Stack(lambda r: Cycle(make_block, unit, chs, (0.0,) * p, r), self.repeats,
                                    rngs=rngs, scan=scan, remat=self.remat)
        start = 1 + self.repeats * self.period
        self.tail = nnx.List([make_block(cfg, chs, rates[start + k], rngs) for k, cfg in enumerate(rest[start - 1:])])

    @property
    def scanned(self) -> bool:
        return self.repeat is not None and self.repeat.scan

    def block_index(self, unit: int, k: int) -> int:
        """The stage-level index of block `k` of repeating cycle `unit`."""
        return 1 + unit * self.period + k

    @property
    def tail_start(self) -> int:
        return 1 + self.repeats * self.period

    def __call__(self, x):
        x = _checkpointed(self.first, x, self.remat)
        if self.repeat is not None:
            x = self.repeat(x)
        for block in self.tail:
            x = _checkpointed(block, x, self.remat)
        return x


def stage_to_blocks(state: Mapping, stage: Stage) -> dict:
    """A stage's pure state as `{j: block_state}` (block `j` of the stage, timm's numbering)."""
    blocks = {0: state["first"]}
    if stage.repeat is not None:
        units = state["repeat"]["blocks"]
        units = stacked_to_blocks(units, stage.repeats) if stage.scanned else units
        for u in range(stage.repeats):
            for k in range(stage.period):
                blocks[stage.block_index(u, k)] = units[u]["blocks"][k]
    for k, block in state.get("tail", {}).items():
        blocks[stage.tail_start + k] = block
    return blocks


def stage_from_blocks(blocks: Mapping, stage: Stage) -> dict:
    """`{j: block_state}` as the pure state of `stage` (its layout: scanned cycles stacked)."""
    want = list(range(stage.tail_start + len(stage.tail)))
    if sorted(blocks) != want:
        raise ValueError(f"`blocks` must hold blocks 0..{want[-1]} of the stage, got {sorted(blocks)}")
    state = {"first": blocks[0]}
    if stage.repeat is not None:
        units = {u: {"blocks": {k: blocks[stage.block_index(u, k)] for k in range(stage.period)}}
                 for u in range(stage.repeats)}
        state["repeat"] = {"blocks": blocks_to_stacked(units) if stage.scanned else units}
    if len(stage.tail):
        state["tail"] = {k: blocks[stage.tail_start + k] for k in range(len(stage.tail))}
    return state


def to_per_block(model_state: Mapping, model) -> dict:
    """A HaloNet's pure state with `stages/<i>/<j>/...` per block (the unrolled timm numbering), either layout."""
    state = dict(model_state)
    state["stages"] = {i: stage_to_blocks(state["stages"][i], stage) for i, stage in enumerate(model.stages)}
    return state


def from_per_block(per_block: Mapping, model) -> dict:
    """`to_per_block`'s layout as the pure state of `model` (a HaloNet of the same configuration, any layout)."""
    state = dict(per_block)
    state["stages"] = {i: stage_from_blocks(state["stages"][i], stage) for i, stage in enumerate(model.stages)}
    return state
