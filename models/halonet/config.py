"""Block-level description of a HaloNet / ByobNet-style network, in timm's terms.

A network is a tuple of stages; a stage is a tuple of `BlockCfg` (one per block). The helpers `stage(...)` and
`interleave(...)` build stages the way timm's `ByoBlockCfg(d=...)` and `interleave_blocks(...)` do, so a timm
`ByoModelCfg` maps one-to-one:

    timm: ByoBlockCfg(type='self_attn', d=3, c=64, s=1, br=1.0)
    here: stage("self_attn", depth=3, out_chs=64, stride=1, bottle_ratio=1.0)

    timm: interleave_blocks(types=('bottle', 'self_attn'), d=6, every=1, c=1024, s=2, br=0.25)
    here: interleave(("bottle", "self_attn"), depth=6, every=1, out_chs=1024, stride=2, bottle_ratio=0.25)

Per-block attention settings (`attn=AttnCfg(...)`) override the model-wide ones, like timm's block-level
`self_attn_kwargs` (which replace, not merge with, the model-level ones).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

BLOCK_TYPES = ("bottle", "self_attn")


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's `make_divisible`: round to the nearest multiple of `divisor`, never below `round_limit * value`."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < round_limit * value:
        new += divisor
    return new


@dataclasses.dataclass(frozen=True)
class AttnCfg:
    """Halo attention settings (timm `HaloAttn` kwargs).

    `dim_head=None` gives `make_divisible(mid_chs * qk_ratio) // num_heads` for queries/keys; values always get
    `mid_chs // num_heads` per head. `avg_down=True` (or a block size not divisible by the stride) downsamples
    with a 2x2 average pool after full-resolution attention instead of strided queries. `implementation` picks
    the `jaxattn.halo_attention` backend (None: the platform's best). `context_parallel='halo'` shards image rows
    over the mesh's `'context'` axis in training (see `layers.HaloAttention`); set it on every block with
    `with_context_parallel`.
    """
    block_size: int = 8
    halo_size: int = 3
    num_heads: int = 8
    dim_head: int | None = None
    qk_ratio: float = 1.0
    qkv_bias: bool = False
    avg_down: bool = False
    scale_pos_embed: bool = False
    implementation: str | None = None
    context_parallel: str | None = None


@dataclasses.dataclass(frozen=True)
class BlockCfg:
    """One residual block: `type` 'bottle' (1x1 - 3x3 - 1x1) or 'self_attn' (1x1 - halo attention - 1x1).

    `stride` applies in the block (2 in a downsampling stage's first block); `bottle_ratio` sets the middle
    width `mid = make_divisible(out_chs * bottle_ratio)`; `attn` overrides the model's `AttnCfg` for this block.
    `value_ratio` (self_attn only; the paper's `rv`) widens the attention output (values, post-attention BN, input
    of the last 1x1) to `make_divisible(mid * value_ratio)`; with `AttnCfg(qk_ratio=1 / value_ratio)` queries and
    keys keep `mid` channels. 1.0 is timm's `SelfAttnBlock`.
    """
    type: str
    out_chs: int
    stride: int = 1
    bottle_ratio: float = 1.0
    attn: AttnCfg | None = None
    value_ratio: float = 1.0

    def __post_init__(self):
        if self.type not in BLOCK_TYPES:
            raise ValueError(f"block `type` must be one of {BLOCK_TYPES}, got {self.type!r}")
        if self.stride not in (1, 2):
            raise ValueError(f"block `stride` must be 1 or 2, got {self.stride}")
        if self.value_ratio != 1.0 and self.type != "self_attn":
            raise ValueError(f"`value_ratio` applies to 'self_attn' blocks only, got {self.value_ratio} for "
                             f"{self.type!r}")


def stage(type: str, depth: int, out_chs: int, stride: int = 2, bottle_ratio: float = 1.0,
          attn: AttnCfg | None = None, value_ratio: float = 1.0) -> tuple[BlockCfg, ...]:
    """`depth` blocks of one type; only the first has `stride` (timm `ByoBlockCfg`)."""
    return tuple(BlockCfg(type, out_chs, stride if i == 0 else 1, bottle_ratio, attn, value_ratio)
                 for i in range(depth))


def interleave(types: Sequence[str], depth: int, out_chs: int, stride: int = 2, bottle_ratio: float = 1.0,
               every: int | Sequence[int] = 1, first: bool = False,
               attn: AttnCfg | None = None) -> tuple[BlockCfg, ...]:
    """timm's `interleave_blocks`: `types[1]` at the positions `every` selects, `types[0]` elsewhere.

    An int `every` puts `types[1]` at `range(0 if first else every, depth, every + 1)`, or at the last block when
    that is empty (so `depth=2, every=1` gives [bottle, self_attn], `depth=4, every=4` gives three bottlenecks
    then one attention block).
    """
    if len(types) != 2:
        raise ValueError(f"`types` must name two block types, got {types!r}")
    if isinstance(every, int):
        positions = list(range(0 if first else every, depth, every + 1)) or [depth - 1]
    else:
        positions = list(every)
    return tuple(BlockCfg(types[1] if i in positions else types[0], out_chs, stride if i == 0 else 1,
                          bottle_ratio, attn) for i in range(depth))


def with_context_parallel(kwargs: dict, strategy: str | None) -> dict:
    """HaloNet constructor `kwargs` with `AttnCfg.context_parallel = strategy` model-wide and on every block that
    overrides `attn` (the model-level setting would not reach those)."""
    attn = dataclasses.replace(kwargs.get("attn", AttnCfg()), context_parallel=strategy)
    stages = [tuple(b if b.attn is None else dataclasses.replace(b, attn=dataclasses.replace(
        b.attn, context_parallel=strategy)) for b in s) for s in kwargs["stages"]]
    return {**kwargs, "attn": attn, "stages": stages}
