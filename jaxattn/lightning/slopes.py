"""Per-head decay slopes of TransNormerLLM: ALiBi's geometric slopes, scaled per layer."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's `get_slopes` (Press et al.), in float64.

    A power of two `n` gives the geometric sequence `start ** (i + 1)` with `start = 2 ** (-8 / n)`. Otherwise the
    slopes of the largest power of two `p < n` come first, then every other slope of `2p` heads (the ones that
    interleave with the first `p`), as many as are missing.
    """
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    p = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(p) + alibi_slopes(2 * p)[0::2][: num_heads - p]


def lightning_slopes(num_heads: int, layer_idx: int | None = None, num_layers: int | None = None):
    """Decay slopes `[num_heads]` (fp32) of TransNormerLLM; head `h` decays by `lambda = exp(-slope[h])` per token.

    Without `layer_idx`/`num_layers` these are ALiBi's slopes (`alibi_slopes`, non-power-of-two head counts
    handled as ALiBi and TransNormerLLM do). With them, layer `l` of `L` scales the slopes by
    `1 - l / (L - 1) + 1e-5`, so the first layer decays fastest and the last barely decays (factor 1e-5). For
    `num_layers == 1` (where TransNormerLLM divides by zero) the single layer keeps the layer-0 factor `1 + 1e-5`.
    """
    if not _is_int(num_heads) or num_heads < 1:
        raise ValueError(f"`num_heads` must be a positive int, got {num_heads!r}")
    if (layer_idx is None) != (num_layers is None):
        raise ValueError(f"give both `layer_idx` and `num_layers`, or neither; got layer_idx={layer_idx!r}, "
                         f"num_layers={num_layers!r}")
    slopes = alibi_slopes(int(num_heads))
    if num_layers is not None:
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"`num_layers` must be a positive int, got {num_layers!r}")
        if not _is_int(layer_idx) or not 0 <= layer_idx < num_layers:
            raise ValueError(f"`layer_idx` must be an int in [0, num_layers={num_layers}), got {layer_idx!r}")
        factor = 1.0 - (layer_idx / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
        slopes = [s * factor for s in slopes]
    return jnp.asarray(np.asarray(slopes, np.float64), jnp.float32)
