"""Public entry point of bi-level routing attention (BiFormer): validation and backend dispatch."""
from __future__ import annotations

import jax.numpy as jnp

from jaxattn.core import dispatch, image_tiles

OP = "bilevel_routing_attention"


def _load_reference():
    from jaxattn.routing.reference import bilevel_routing_reference
    return bilevel_routing_reference


def _load_xla():
    from jaxattn.routing.xla import bilevel_routing_xla
    return bilevel_routing_xla


dispatch.register(OP, dispatch.Backend("reference", _load_reference, platforms=(), priority=-1))
dispatch.register(OP, dispatch.Backend("xla", _load_xla, platforms=None, priority=0))


def bilevel_routing_attention(query, key, value, num_regions, topk, *, scale=None, implementation=None):
    """BiFormer bi-level routing attention on projected, head-split q/k/v (official `BiLevelRoutingAttention`
    with `kv_downsample_mode='identity'`, `diff_routing=False`, `soft_routing=False`, before LCE and `wo`).

    1. The map is split into `Sh x Sw` regions (`num_regions`, BiFormer's `n_win` per side), row-major.
    2. Region queries/keys: means of q and k over each region, from **detached** tensors, all heads together
       (`[N * D]` vectors). Affinity `(q_r * scale) @ k_r^T`; each query region keeps its `topk` key regions. No
       gradient flows through this selection (the routing weights are unused, as in the released models).
    3. Each query attends, per head, with one softmax over all tokens of its region's `topk` key regions:
       `softmax(scale * q . k) v`.

    Scale quirk: BiFormer uses `qk_dim ** -0.5` with `qk_dim` the full q/k width (`N * D`), not the head dim, for
    both the routing and the token attention; that is the default here. Pass `scale=D ** -0.5` for the usual one.
    `topk = Sh * Sw` is plain global attention. The official model pads `H`, `W` up to multiples of `n_win`
    (`auto_pad`) before its qkv projection; do that in the model: this op requires divisibility.

    Args:
      query, key: `[B, H, W, N, D]`; value: `[B, H, W, N, Dv]`; one dtype.
      num_regions: `S` or `(Sh, Sw)`; `H % Sh == 0` and `W % Sw == 0`.
      topk: `1 <= topk <= Sh * Sw` routed key regions per query region.
      scale: default `(N * D) ** -0.5` (BiFormer's).
      implementation: 'reference' (gather-based, k-fold k/v copies), 'xla' (scan over routed regions with an
        online softmax and a recomputing backward: no k-fold copies), or None for the best available.

    Returns:
      `[B, H, W, N, Dv]` in the query dtype.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    image_tiles.check_image_qkv(query, key, value)
    image_tiles.check_same_spatial("key", key, "query", query)
    num_regions = image_tiles.tile_size("num_regions", num_regions)
    h, w = query.shape[1:3]
    if h % num_regions[0] or w % num_regions[1]:
        raise ValueError(f"`query` height and width {(h, w)} (shape {tuple(query.shape)}) must be multiples of "
                         f"`num_regions` {num_regions}; pad the input first (BiFormer's auto_pad)")
    regions = num_regions[0] * num_regions[1]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= regions:
        raise ValueError(f"`topk` must be an int in [1, {regions}] (the number of regions {num_regions}), "
                         f"got {topk!r}")
    scale = (query.shape[3] * query.shape[4]) ** -0.5 if scale is None else float(scale)
    return dispatch.call(OP, implementation,
                         lambda impl: impl(query, key, value, num_regions=num_regions, topk=topk, scale=scale),
                         query=query, key=key, value=value)
