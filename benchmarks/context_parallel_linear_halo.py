"""LASP-2 and halo-exchange rows of `benchmarks/context_parallel.py` (registered there; not run on its own).

- `lasp2`: lightning attention (TransNormerLLM decay slopes), `[B, T, heads, head_dim]`, causal unless
  `--non-causal`. Sends `P` states of `[B, heads, head_dim, head_dim]` fp32: flat in T.
- `halo_na1d`: neighborhood attention over the sequence, kernel 7, dilation 2, `kv_heads` key heads, causal unless
  `--non-causal`. Sends `(k//2)*d` (causal: `(k-1)*d`) border tokens of K and V each way: flat in T.
- `halo_na2d`: DiNAT-style 2-D NA (kernel 7, dilation 2, rpb) on a `T/32 x 32` map (32 x 32 at T = 1k), rows
  sharded: 6 rows of 32 tokens each way, flat in T. (A square map's rows grow as `sqrt(T)`, and so do its
  borders: the traffic follows the width of the map, never its height.)
- `halo_halonet`: HaloNet blocks (block 8, halo 3) on the same `T/32 x 32` map, rows sharded on block
  boundaries: 3 rows each way.
"""
from __future__ import annotations

NA_KERNEL, NA_DILATION = 7, 2
HALONET_BLOCK, HALONET_HALO = 8, 3
WIDTH = 32  # of the 2-D maps; T / WIDTH rows are sharded


def _normal(rng, *shapes):
    import jax.numpy as jnp
    return tuple(jnp.asarray(rng.standard_normal(s, dtype="float32")) for s in shapes)


def _rows(T):
    return T // WIDTH if T % WIDTH == 0 else 0


def _lasp2_inputs(rng, T, args):
    return _normal(rng, *[(args.batch, T, args.heads, args.head_dim)] * 3)


def _lasp2(mesh, q, k, v, args):
    import jaxattn
    from jaxattn.context_parallel import lasp2_lightning_attention
    slopes = jaxattn.lightning_slopes(q.shape[2])
    return lasp2_lightning_attention(q, k, v, slopes=slopes, is_causal=args.causal, mesh=mesh)


def _na1d_inputs(rng, T, args):
    kv = (args.batch, T, args.kv_heads, args.head_dim)
    return _normal(rng, (args.batch, T, args.heads, args.head_dim), kv, kv)


def _na1d(mesh, q, k, v, args):
    from jaxattn.context_parallel import halo_neighborhood_attention
    return halo_neighborhood_attention(q, k, v, NA_KERNEL, dilation=NA_DILATION, is_causal=args.causal, mesh=mesh)


def _na1d_applies(T, n, args):
    from jaxattn.context_parallel.halo_exchange import neighborhood_halo
    return T % n == 0 and max(neighborhood_halo(T, n, NA_KERNEL, NA_DILATION, args.causal)) <= T // n


def _image_inputs(rng, T, args):
    return _normal(rng, *[(args.batch, _rows(T), WIDTH, args.heads, args.head_dim)] * 3)


def _na2d_inputs(rng, T, args):
    return _image_inputs(rng, T, args) + _normal(rng, (args.heads, 2 * NA_KERNEL - 1, 2 * NA_KERNEL - 1))


def _na2d(mesh, q, k, v, rpb, args):
    from jaxattn.context_parallel import halo_neighborhood_attention
    return halo_neighborhood_attention(q, k, v, NA_KERNEL, dilation=NA_DILATION, rpb=rpb, axis=1, mesh=mesh)


def _na2d_applies(T, n, args):
    from jaxattn.context_parallel.halo_exchange import neighborhood_halo
    rows = _rows(T)
    return rows > 0 and rows % n == 0 and max(neighborhood_halo(rows, n, NA_KERNEL, NA_DILATION)) <= rows // n


def _halonet(mesh, q, k, v, args):
    from jaxattn.context_parallel import halo_exchange_halo_attention
    return halo_exchange_halo_attention(q, k, v, HALONET_BLOCK, HALONET_HALO, axis=1, mesh=mesh)


def _halonet_applies(T, n, args):
    rows = _rows(T)
    return rows > 0 and rows % (n * HALONET_BLOCK) == 0


def strategies(strategy_cls):
    """The rows, as `strategy_cls(name, run, make_inputs, applies)` (the benchmark's `Strategy`)."""
    return [
        strategy_cls("lasp2", _lasp2, _lasp2_inputs),
        strategy_cls("halo_na1d", _na1d, _na1d_inputs, _na1d_applies),
        strategy_cls("halo_na2d", _na2d, _na2d_inputs, _na2d_applies),
        strategy_cls("halo_halonet", _halonet, _image_inputs, _halonet_applies),
    ]
