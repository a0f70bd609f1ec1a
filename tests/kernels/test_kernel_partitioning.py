"""The kernels run per shard under `jit` sharding (`kernels/common/partition.py`).

TPU (libtpu, deviceless, `v5e:2x2`): a train-step-like forward + gradient of dot-product (causal, GQA),
neighborhood (2-D) and lightning attention, with the batch split over the four chips and with a (data 2 x
tensor 2) mesh splitting batch and heads, compiles with the Mosaic kernels in the program, each running on its
shard's rows and heads, and without an all-gather of q/k/v; ring attention on a (data 2 x context 2)
mesh runs its kernels on the `data` shards inside its `context` shard_map, and a user's `shard_map(check_vma=True)`
gets them from dispatch too. CPU (4 forced host devices): the sharded `jit` of
the Pallas kernels (interpret mode) equals their unsharded result, forward and gradients.
"""
import math
import os
import re

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxattn  # noqa: E402

B, T, N, K, H = 4, 256, 4, 2, 128  # GQA: 2 query heads per key/value head


def _dot_product(q, k, v, implementation=None):
    return jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def _neighborhood(q, k, v, implementation=None):
    side = math.isqrt(q.shape[1])  # the tokens as a square image
    shape = (q.shape[0], side, side, *q.shape[2:])
    out = jaxattn.neighborhood_attention(q.reshape(shape), k.reshape(shape[:3] + k.shape[2:]),
                                         v.reshape(shape[:3] + v.shape[2:]), (5, 5), implementation=implementation)
    return out.reshape(q.shape[:2] + out.shape[3:])


def _lightning(q, k, v, implementation=None):
    return jaxattn.lightning_attention(q, k, v, slopes=jnp.linspace(0.5, 0.9, q.shape[2]),
                                      implementation=implementation)


# op, key/value heads, the Mosaic kernel names the program must hold
OPS = {
    "dot_product": (_dot_product, K, ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv")),
    "neighborhood": (_neighborhood, N, ("neighborhood_attention_fwd", "neighborhood_attention_dq",
                                        "neighborhood_attention_dkv")),
    "lightning": (_lightning, N, ("lightning_scan", "lightning_scan_reverse")),
}


def _dot_product_features(q, k, v, bias, sinks, implementation=None):
    """Bias shared by the batch rows (its gradient summed over them), sinks, two documents per row."""
    segments = (jnp.arange(q.shape[1]) >= q.shape[1] // 3).astype(jnp.int32)[None].repeat(q.shape[0], 0)
    return jaxattn.dot_product_attention(q, k, v, bias, sinks=sinks, query_segment_ids=segments,
                                         key_segment_ids=segments, implementation=implementation)


def _neighborhood_rpb(q, k, v, rpb, implementation=None):
    side = math.isqrt(q.shape[1])
    shape = (q.shape[0], side, side, *q.shape[2:])
    out = jaxattn.neighborhood_attention(q.reshape(shape), k.reshape(shape[:3] + k.shape[2:]),
                                         v.reshape(shape[:3] + v.shape[2:]), (3, 3), dilation=2, rpb=rpb,
                                         implementation=implementation)
    return out.reshape(q.shape[:2] + out.shape[3:])


# CPU only: differentiated extras (shapes for T tokens): the dlogits / d rpb kernels' outputs per shard too.
WITH_FEATURES = {
    "dot_product_features": (_dot_product_features, K, lambda t: [(1, N, t, t), (N,)]),
    "neighborhood_rpb_dilated": (_neighborhood_rpb, N, lambda t: [(N, 5, 5)]),
}
MESHES = {"batch_over_4": ((4,), ("data",)), "data_2_tensor_2": ((2, 2), ("data", "tensor"))}


def _loss_and_grads(op, count=3, implementation=None):
    """The sum of squares of `op(*args)` and its gradients for the first `count` arguments (all of them)."""
    def loss(*args):
        return jnp.sum(op(*args, implementation).astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=tuple(range(count)))


def _specs(mesh, kv_heads, dtype):
    heads = "tensor" if "tensor" in mesh.axis_names else None
    sharding = NamedSharding(mesh, P("data", None, heads, None))
    return [jax.ShapeDtypeStruct((B, T, n, H), dtype, sharding=sharding) for n in (N, kv_heads, kv_heads)]


@pytest.fixture(scope="module")
def tpu_devices():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("op_name", OPS)
def test_kernels_compile_per_shard_for_tpu(tpu_devices, op_name, mesh_name):
    op, kv_heads, kernels = OPS[op_name]
    shape, names = MESHES[mesh_name]
    mesh = jax.sharding.Mesh(np.array(tpu_devices).reshape(shape), names)
    compiled = jax.jit(_loss_and_grads(op)).trace(*_specs(mesh, kv_heads, jnp.bfloat16)).lower().compile()
    hlo = compiled.as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    for name in kernels:
        assert any(f"%{name}" in line for line in calls), (name, [c[:80] for c in calls])
    # Every kernel sees its shard: batch B / data, heads N / tensor (the leading dims of its first result).
    local_batch = B // mesh.shape["data"]
    local_heads = N // mesh.shape.get("tensor", 1)
    for line in calls:
        if "flash_attention_fwd" in line or "neighborhood_attention_fwd" in line or "lightning_scan." in line:
            dims = re.search(r"= \(?bf16\[(\d+),(\d+),", line)
            assert dims and (int(dims[1]), int(dims[2])) == (local_batch, local_heads), line[:160]
    # No all-gather of activations (q/k/v or outputs are B x T x heads x H / 4 elements and more per shard).
    for gathered in re.findall(r"= (\w+)\[([\d,]*)\][^\n]* all-gather\(", hlo):
        size = int(np.prod([int(d) for d in gathered[1].split(",") if d] or [1]))
        assert size < B * T * N * H // 8, gathered


def test_ring_attention_runs_the_kernels_on_a_data_x_context_mesh(tpu_devices):
    """Context parallelism on a pod: ring attention's shard_map is manual over `context` only, and the kernels
    inside split the rest (`data`) themselves; forward and gradient compile with the flash kernels per shard."""
    from jaxattn import context_parallel
    mesh = jax.sharding.Mesh(np.array(tpu_devices).reshape(2, 2), ("data", "context"))
    sharding = NamedSharding(mesh, P("data", "context"))
    q, k = (jax.ShapeDtypeStruct((B, 4 * T, n, H), jnp.bfloat16, sharding=sharding) for n in (N, K))

    def loss(q, k, v):
        out = context_parallel.ring_attention(q, k, v, mesh=mesh, axis_name="context", is_causal=True)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower().compile().as_text()
    calls = re.findall(r"%([a-z_]+)(?:\.\d+)? = \(?(\w+)\[(\d+),.*custom_call_target=\"tpu_custom_call\"", text)
    assert {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"} <= {c[0] for c in calls}, calls
    assert {int(c[2]) for c in calls} == {B // 2}, calls  # each kernel runs on its `data` shard's rows


def test_dispatch_picks_the_kernels_inside_a_checked_shard_map(tpu_devices):
    """A user's `shard_map(check_vma=True)` manual over every axis: `implementation=None` still lowers the flash
    kernels for TPU (their results typed varying like the operands), forward and gradients."""
    mesh = jax.sharding.Mesh(np.array(tpu_devices).reshape(4), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    q, k = (jax.ShapeDtypeStruct((B, T, n, H), jnp.bfloat16, sharding=sharding) for n in (N, K))
    attend = jax.shard_map(_dot_product, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=True)

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower().compile().as_text()
    calls = re.findall(r"%([a-z_]+)(?:\.\d+)? = \(?(\w+)\[(\d+),.*custom_call_target=\"tpu_custom_call\"", text)
    assert {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"} <= {c[0] for c in calls}, calls
    assert {int(c[2]) for c in calls} == {B // 4}, calls


@pytest.mark.devices(4)
@pytest.mark.parametrize("op_name", [*OPS, *WITH_FEATURES])
def test_sharded_pallas_kernels_match_unsharded(op_name):
    op, kv_heads, extras = WITH_FEATURES[op_name] if op_name in WITH_FEATURES else (*OPS[op_name][:2], lambda t: [])
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    b, t = 2, 64  # one batch row per shard
    shapes = [(b, t, N, 32), (b, t, kv_heads, 32), (b, t, kv_heads, 32), *extras(t)]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    args = [jax.random.normal(key, s, jnp.float32) for key, s in zip(keys, shapes)]
    fn = jax.jit(_loss_and_grads(op, len(args), "pallas"))
    expected = fn(*args)
    by_batch_and_heads = NamedSharding(mesh, P("data", None, "tensor", None))
    sharded_args = [jax.device_put(x, by_batch_and_heads) for x in args[:3]] + args[3:]
    assert "sdy.manual_computation" in fn.lower(*sharded_args).as_text()  # the kernels' shard_map
    for got, want in zip(jax.tree.leaves(fn(*sharded_args)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
