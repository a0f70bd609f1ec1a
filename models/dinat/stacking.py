"""How a DiNAT stage's blocks go into `Stack`s, and the per-block (reference) names of a model in either layout.

A block's dilation is static (it changes the neighborhood op's kernel), so blocks of different dilations cannot
share one scanned step. A stage's dilations repeat with a short period (DiNAT alternates 1 and a larger dilation:
`[1, 8, 1]`, `[1, 4, 1, 4]`, `[1, 2] * 9`; NAT and the last stage: `[1] * 5`), so the stage is split into
segments (`segment_plan`): a `Stack` of `n` units, each unit the blocks of one period (a pair NA, DiNA), then the
remainder (a prefix of the period) as one more unit. Scanned or unrolled, the segments are the same, so both
layouts run the same blocks under the same remat policy and differ only in how parameters are stored.

Per-block names are the reference's (`levels/<i>/blocks/<j>/...`, `j` counting the stage's blocks): `to_per_block`
and `from_per_block` convert a pure state (`nnx.to_pure_dict`) between them and the model's layout, exactly;
`unit_views` / `write_back` give the weight loader one module per unit in either layout.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from jaxattn.models.layers.stack import Stack, blocks_to_stacked, stacked_to_blocks


def segment_plan(dilations: Sequence[int]) -> tuple[tuple[tuple[int, ...], int], ...]:
    """`((unit_dilations, n), ...)`: the stage's blocks as `n` repeats of the shortest repeating unit, then the
    remainder once. `[1, 8, 1]` -> `(((1, 8), 1), ((1,), 1))`; `[1, 2] * 9` -> `(((1, 2), 9),)`."""
    dilations = tuple(int(d) for d in dilations)
    period = next(p for p in range(1, len(dilations) + 1)
                  if all(d == dilations[i % p] for i, d in enumerate(dilations)))
    n, rest = divmod(len(dilations), period)
    plan = [(dilations[:period], n)]
    if rest:
        plan.append((dilations[n * period:], 1))
    return tuple(plan)


def block_positions(plan) -> list[tuple[int, int, int]]:
    """`(segment, unit, block within the unit)` of each of the stage's blocks, in order."""
    return [(s, u, k) for s, (unit, n) in enumerate(plan) for u in range(n) for k in range(len(unit))]


def _segments_to_blocks(segments: Mapping, plan, scanned: bool) -> dict:
    """A stage's `segments` pure state -> `{j: block_state}`."""
    units = [stacked_to_blocks(segments[s]["blocks"], n) if scanned else segments[s]["blocks"]
             for s, (_, n) in enumerate(plan)]
    return {j: dict(units[s][u]["blocks"][k]) for j, (s, u, k) in enumerate(block_positions(plan))}


def _blocks_to_segments(blocks: Mapping, plan, scanned: bool) -> dict:
    positions = block_positions(plan)
    if sorted(blocks) != list(range(len(positions))):
        raise ValueError(f"a stage of {len(positions)} blocks needs blocks 0..{len(positions) - 1}, got "
                         f"{sorted(blocks)}")
    units: dict = {}
    for j, (s, u, k) in enumerate(positions):
        units.setdefault(s, {}).setdefault(u, {"blocks": {}})["blocks"][k] = blocks[j]
    return {s: {"blocks": blocks_to_stacked(units[s]) if scanned else units[s]} for s in units}


def to_per_block(state: Mapping, model) -> dict:
    """`model`'s pure state (either layout) with each stage's blocks as `levels/<i>/blocks/<j>/...`."""
    state = dict(state)
    levels = {}
    for i, level in enumerate(model.levels):
        entry = dict(state["levels"][i])
        entry["blocks"] = _segments_to_blocks(entry.pop("segments"), level.plan, model.scan_blocks)
        levels[i] = entry
    return {**state, "levels": levels}


def from_per_block(per_block: Mapping, model) -> dict:
    """The per-block layout as a pure state in `model`'s layout (scanned segments stacked, unrolled ones not)."""
    state = dict(per_block)
    levels = {}
    for i, level in enumerate(model.levels):
        entry = dict(state["levels"][i])
        entry["segments"] = _blocks_to_segments(entry.pop("blocks"), level.plan, model.scan_blocks)
        levels[i] = entry
    return {**state, "levels": levels}


def unit_views(stack: Stack) -> list[nnx.Module]:
    """One module per unit of `stack`: its own blocks when unrolled; when scanned, modules holding each unit's
    slice of the stacked variables (copies: `write_back` stores their parameters into the stack)."""
    if not stack.scan:
        return list(stack.blocks)
    graphdef, state = nnx.split(stack.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, u=u: a[u], state)) for u in range(stack.n)]


def write_back(stack: Stack, views: Sequence[nnx.Module]) -> None:
    """Stores the parameters of `unit_views(stack)` (after they were set) into `stack`."""
    if not stack.scan:
        return
    params = nnx.state(stack.blocks, nnx.Param)
    nnx.replace_by_pure_dict(params, blocks_to_stacked(
        {u: nnx.to_pure_dict(nnx.state(view, nnx.Param)) for u, view in enumerate(views)}))
    nnx.update(stack.blocks, params)
