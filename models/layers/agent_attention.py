"""Agent attention over an image map (Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear
Attention"), a drop-in for a vision model's global attention on `[B, H, W, C]` maps.

Per head, `n = p x p` agent tokens are the queries average-pooled to a `p x p` grid (adaptive pooling, exact for any
map size). They gather from the keys and broadcast back to the queries with `jaxattn.agent_attention`, whose two
logit matrices get the paper's position biases:
  agent -> key   `key_bias [N, n, H*W]`:  `bilinear(agent_key_table [N, n, 7, 7] -> H x W) + agent_row [N, n, H, 1]
                                           + agent_col [N, n, 1, W]`
  query -> agent `query_bias [N, H*W, n]`: `bilinear(query_agent_table [N, n, 7, 7] -> H x W)^T
                                           + row_agent [N, H, 1, n] + col_agent [N, 1, W, n]`
(bilinear as torch's `interpolate(..., align_corners=False)`). A 3 x 3 depthwise conv of V (with bias) is added to
the attention output before the output projection. Cost is linear in the number of tokens.

The row/column biases are sized for `input_size`; a map of another size is a ValueError.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxattn
from jaxattn.models.layers import axes
from jaxattn.models.layers.dense import Dense
from jaxattn.models.layers.depthwise import DepthwiseConv2d

BIAS_TABLE_SIZE = 7  # the paper's 7 x 7 tables, resized to the map


def adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
    """`[bins, size]` averaging weights of torch's `AdaptiveAvgPool` along one axis: bin `i` covers
    `floor(i * size / bins) .. ceil((i + 1) * size / bins) - 1` (bins overlap when `bins` does not divide `size`)."""
    weights = np.zeros((bins, size), np.float32)
    for i in range(bins):
        start, stop = (i * size) // bins, -(-((i + 1) * size) // bins)
        weights[i, start:stop] = 1.0 / (stop - start)
    return weights


def pool_agents(query_map, grid: int):
    """`[B, H, W, C] -> [B, grid * grid, C]`: adaptive average pooling of the queries, agents in row-major order."""
    rows = adaptive_pool_matrix(query_map.shape[1], grid).astype(query_map.dtype)
    cols = adaptive_pool_matrix(query_map.shape[2], grid).astype(query_map.dtype)
    pooled = jnp.einsum("ph,bhwc,qw->bpqc", rows, query_map, cols)
    return pooled.reshape(query_map.shape[0], grid * grid, query_map.shape[-1])


def resize_table(table, size: tuple[int, int]):
    """`[..., 7, 7] -> [..., H, W]` bilinear with half-pixel centres and no antialiasing (torch's `interpolate`
    with `mode='bilinear', align_corners=False`, up or down)."""
    return jax.image.resize(table, (*table.shape[:-2], *size), method="bilinear", antialias=False)


def _bias_param(rngs: nnx.Rngs, shape, param_dtype=jnp.float32):
    """A per-head bias table (heads first; logical names: heads, then replicated dims)."""
    value = 0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(param_dtype), **axes.param_metadata((axes.HEADS,) + (None,) * (len(shape) - 1)))


class AgentAttention(nnx.Module):
    """Agent attention on `[B, H, W, dim]` maps -> `[B, H, W, dim]`.

    Parameters: `qkv` (dim -> 3 dim, bias if `qkv_bias`), `proj` (dim -> dim, bias), `dwc` (3 x 3 depthwise conv of
    V, bias), and the agent biases `agent_key_table`, `query_agent_table` `[N, n, 7, 7]`, `agent_row [N, n, H, 1]`,
    `agent_col [N, n, 1, W]`, `row_agent [N, H, 1, n]`, `col_agent [N, 1, W, n]` (truncated normal, std 0.02).
    `implementation` is passed to `jaxattn.agent_attention`; `dtype` is the compute dtype, `param_dtype` the
    storage dtype (softmax statistics fp32 inside the op). Logical names: the fused qkv and the output projection
    split their `EMBED` dim (FSDP), not heads (its `3 * dim` outputs interleave q, k and v).
    """

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], *, agent_grid: int = 7,
                 qkv_bias: bool = True, implementation: str | None = None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be a multiple of `num_heads` ({num_heads})")
        height, width = (int(s) for s in input_size)
        if agent_grid < 1 or min(height, width) < 1:
            raise ValueError(f"`agent_grid` ({agent_grid}) and `input_size` {tuple(input_size)} must be positive")
        self.dim, self.num_heads, self.input_size, self.agent_grid = dim, num_heads, (height, width), agent_grid
        self.implementation, self.dtype = implementation, dtype
        self.scale = (dim // num_heads) ** -0.5
        init = nnx.initializers.truncated_normal(0.02)
        kw = dict(kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(dim, 3 * dim, use_bias=qkv_bias, names=(axes.EMBED, None), **kw)
        self.proj = Dense(dim, dim, names=(None, axes.EMBED), **kw)
        self.dwc = DepthwiseConv2d(dim, 3, names=(axes.CONV_KERNEL, axes.CONV_KERNEL, None, axes.EMBED),
                                   param_dtype=param_dtype, rngs=rngs)
        n, agents, table = num_heads, agent_grid * agent_grid, BIAS_TABLE_SIZE
        self.agent_key_table = _bias_param(rngs, (n, agents, table, table), param_dtype)
        self.query_agent_table = _bias_param(rngs, (n, agents, table, table), param_dtype)
        self.agent_row = _bias_param(rngs, (n, agents, height, 1), param_dtype)
        self.agent_col = _bias_param(rngs, (n, agents, 1, width), param_dtype)
        self.row_agent = _bias_param(rngs, (n, height, 1, agents), param_dtype)
        self.col_agent = _bias_param(rngs, (n, 1, width, agents), param_dtype)

    def biases(self):
        """`(key_bias [N, n, H*W], query_bias [N, H*W, n])` in fp32, for `jaxattn.agent_attention`."""
        n, agents = self.num_heads, self.agent_grid ** 2
        tokens = self.input_size[0] * self.input_size[1]
        f32 = lambda v: v[...].astype(jnp.float32)  # noqa: E731
        key_bias = (resize_table(f32(self.agent_key_table), self.input_size)
                    + f32(self.agent_row) + f32(self.agent_col)).reshape(n, agents, tokens)
        query_table = resize_table(f32(self.query_agent_table), self.input_size).reshape(n, agents, tokens)
        query_bias = jnp.swapaxes(query_table, 1, 2) + (f32(self.row_agent) + f32(self.col_agent)).reshape(
            n, tokens, agents)
        return key_bias, query_bias

    def __call__(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != (*self.input_size, self.dim):
            raise ValueError(f"`x` must be [B, H, W, C] = [B, {self.input_size[0]}, {self.input_size[1]}, {self.dim}] "
                             f"(the agent biases are sized for `input_size`), got {tuple(x.shape)}")
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        agents = pool_agents(q, self.agent_grid)
        heads = lambda t: t.reshape(b, -1, self.num_heads, c // self.num_heads)  # noqa: E731  [B, L, N, D]
        key_bias, query_bias = (bias.astype(q.dtype) for bias in self.biases())
        out = jaxattn.agent_attention(heads(q), heads(k), heads(v), heads(agents), key_bias=key_bias,
                                      query_bias=query_bias, scale=self.scale, implementation=self.implementation)
        out = out.reshape(b, h, w, c) + self.dwc(v)
        return self.proj(out)
