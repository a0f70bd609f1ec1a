"""Context and tensor parallelism in training: each family with its strategies on a `context > 1` mesh, and the
language models on a `tensor = 2` mesh (Megatron: heads, kv heads, MLP units and vocabulary split; alone and with
ring attention over `context`), train exactly like the same config on `context = tensor = 1` (loss and
gradient-norm curves on the same fixed data); the config key reaches the models, and bad combinations fail naming
the key.

The 8-device cases run in one child process (`@pytest.mark.devices(8)`: language models, the command line, then
vision models; a child's start-up is paid once). Each family's reference curve is computed once and shared by its
strategies and meshes.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import mesh_curves
import numpy as np
import pytest
from flax import nnx

from jaxattn.train import state as state_lib
from jaxattn.train import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LM = mesh_curves.LM
# 64 px at context 4: maps of 16 rows (dilation 2) and 8 rows shard with halos, 4 rows run the single-device op.
DINAT = dict(embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 2), mlp_ratio=2.0, kernel_size=3,
             dilations=((2,), (1,), (1,)), img_size=64, drop_path_rate=0.0)


def _halonet_kwargs():
    from jaxattn.models.halonet.config import AttnCfg, stage
    # 32 px at context 4: halo layers see 8x8 (stages 1, 2: rows shard into whole blocks of 2), then 4x4 (the
    # single-device op).
    return dict(stages=[stage("self_attn", 1, c, 1 if i == 0 else 2) for i, c in enumerate((16, 16, 24))],
                stem_chs=8, attn=AttnCfg(block_size=2, halo_size=1, num_heads=2), img_size=32, drop_path_rate=0.0)


CONTEXT4 = {"data": 2, "fsdp": 1, "context": 4}
TENSOR2 = {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
TENSOR2_CONTEXT4 = {"data": 1, "fsdp": 1, "tensor": 2, "context": 4}


def _compare_family(cases, batches, num_outputs):
    """`cases`: `[(name, config, mesh)]` of one family. The reference is the first config on `context = tensor =
    1`, where every layer runs its single-device op (strategies and meshes change how a layer runs, never the
    model). Cases on a mesh with `tensor > 1` also check that the weights are really split over it."""
    want = mesh_curves.curves(cases[0][1], mesh_curves.REFERENCE_MESH, batches, num_outputs)
    for name, config, mesh in cases:
        inspect = _assert_lm_split_over_tensor if mesh.get("tensor", 1) > 1 and config.task == "lm" else None
        mesh_curves.assert_same_curves(name, mesh_curves.curves(config, mesh, batches, num_outputs,
                                                                inspect=inspect), want)


def _assert_lm_split_over_tensor(state_shardings):
    params = nnx.to_pure_dict(state_shardings.params)
    layer = params["segments"][len(params["segments"]) - 1]["blocks"]  # stacked: [layers, ...]
    mixer = layer["mixer"]
    heads = mixer["q_proj"]["kernel"].spec if "q_proj" in mixer else mixer["qkvu"]["kernel"].spec
    assert heads[0] is None and "tensor" in heads, heads  # [layers, embed, (4,) heads, head_dim]
    assert layer["mlp"]["l1"]["kernel"].spec[2] == "tensor" and params["head"]["kernel"].spec[1] == "tensor"


@pytest.mark.devices(8)
def test_models_train_alike_on_context_and_tensor_meshes(tmp_path, monkeypatch):
    check_language_models()
    _run_main_with_context(tmp_path, monkeypatch)
    check_vision_models()


def check_language_models():
    batches = mesh_curves.lm_batches(32)
    softmax = [(f"softmax_lm/{s}", mesh_curves.config("softmax_lm_tiny", strategy=s, **LM), CONTEXT4)
               for s in ("ring", "allgather", "ulysses")]
    softmax += [("softmax_lm tensor=2", mesh_curves.config("softmax_lm_tiny", **LM), TENSOR2),
                ("softmax_lm/ring tensor=2 context=4", softmax[0][1], TENSOR2_CONTEXT4)]
    _compare_family(softmax, batches, 260)
    gqa = mesh_curves.config("softmax_lm_tiny", num_kv_heads=1, **LM)  # its one kv head replicated over tensor
    _compare_family([("softmax_lm/gqa tensor=2", gqa, TENSOR2)], batches, 260)
    transnormer = mesh_curves.config("transnormer_tiny", strategy="lasp2", block_size=4, **LM)
    _compare_family([("transnormer/lasp2", transnormer, CONTEXT4), ("transnormer tensor=2", transnormer, TENSOR2)],
                    batches, 260)


def _run_main_with_context(tmp_path, monkeypatch):
    """The command line with `--config.mesh.context=2 --config.context_parallel=ring` trains and evaluates
    (`train.main`'s own flag parsing and entry function, in this process)."""
    from absl import flags
    from jaxattn.train import datasets, main, metrics
    tfds_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "work")
    datasets.prepare("stdlib_bytes", tfds_dir)
    argv = ["train", f"--config={ROOT}/configs/softmax_lm.py", f"--workdir={workdir}", f"--config.data_dir={tfds_dir}",
            "--config.mesh.context=2", "--config.context_parallel=ring", "--config.seq_len=32",
            "--config.batch_size=4", "--config.eval_batch_size=4", "--config.eval_max_examples=4",
            "--config.num_train_steps=2", "--config.log_every=1", "--config.checkpoint_every=2",
            "--config.compile_fast=True", "--config.data_threads=1", "--config.async_checkpointing=False"]
    monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
    flags.FLAGS(argv)
    assert flags.FLAGS["config"].value.context_parallel == "ring"
    assert main.main(["train"]) == 0
    losses = [r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses))


def _vision_config(model, image_size, **model_kwargs):
    c = mesh_curves.config(model, task="classification", strategy="halo", **model_kwargs)
    c.image_size = image_size
    return c


def _rows_sharded(config, layers, mesh_axes):
    """Which attention layers (`layers(model)` -> `[(op, layer, query, key, positional args, keyword args)]`) run
    the halo strategy on `mesh_axes`."""
    from jaxattn.models import context_parallel as cp
    from jaxattn.train import sharding
    model = nnx.eval_shape(lambda: state_lib.build_model(config, 10, nnx.Rngs(0)))
    with jax.set_mesh(sharding.make_mesh(mesh_axes, devices=jax.devices()[:math.prod(mesh_axes.values())])):
        return [cp.strategy_function(op, layer.context_parallel, q, k, k, *args, **kwargs) is not None
                for op, layer, q, k, args, kwargs in layers(model)]


def _map(rows, channels=8):
    return jax.ShapeDtypeStruct((1, rows, rows, 1, channels), jnp.float32)


def check_vision_models():
    dinat = _vision_config("dinat_pico", 64, **DINAT)
    def dinat_layers(m):
        attn = [lv.segments[0].template.blocks[0].attn for lv in m.levels]
        return [("neighborhood_attention", a, _map(r), _map(r), (a.kernel_size,), dict(dilation=a.dilation))
                for a, r in zip(attn, (16, 8, 4))]
    assert _rows_sharded(dinat, dinat_layers, CONTEXT4) == [True, True, False]
    _compare_family([("dinat/halo", dinat, CONTEXT4)], mesh_curves.image_batches(64), 10)
    halonet = _vision_config("halonet_pico", 32, **_halonet_kwargs())
    assert _rows_sharded(halonet, lambda m: [("halo_attention", s.first.self_attn, _map(r), _map(r),
                                               (s.first.self_attn.block_size, s.first.self_attn.halo_size), {})
                                              for s, r in zip(m.stages, (8, 8, 4))], CONTEXT4) == [True, True, False]
    _compare_family([("halonet/halo", halonet, CONTEXT4)], mesh_curves.image_batches(32), 10)


# ---------------------------------------------------------------------------------------------------------------
# Cheap checks in the parent process.

@pytest.mark.parametrize("model,strategy,options", [
    ("softmax_lm_tiny", "lasp2", "ring"), ("transnormer_tiny", "ring", "lasp2"), ("dinat_pico", "ring", "halo"),
    ("halonet_pico", "ulysses", "halo")])
def test_unsupported_strategy_names_the_key(model, strategy, options):
    from jaxattn.models import create_model, get_entry
    kwargs = {"vocab_size": 260} if get_entry(model).kind == "lm" else {}
    with pytest.raises(ValueError, match=f"`context_parallel` .* one of .*'{options}'.* got '{strategy}'"):
        nnx.eval_shape(lambda: create_model(model, rngs=nnx.Rngs(0), context_parallel=strategy, **kwargs))


def test_config_key_reaches_the_model_and_is_checked_per_family():
    config = mesh_curves.config("softmax_lm_tiny", strategy="ulysses", **LM)
    model = nnx.eval_shape(lambda: state_lib.build_model(config, 260, nnx.Rngs(0)))
    assert {segment.template.mixer.context_parallel for segment in model.segments} == {"ulysses"}
    config.context_parallel = "lasp2"
    with pytest.raises(validate.ConfigError, match=r"config\.context_parallel = 'lasp2'.*softmax_lm.*'ring'"):
        state_lib.build_model(config, 260, nnx.Rngs(0))
    config = mesh_curves.config("maxvit_pico", task="classification", strategy="halo")
    with pytest.raises(validate.ConfigError, match=r"config\.context_parallel = 'halo'.*maxvit.*no context"):
        state_lib.build_model(config, 10, nnx.Rngs(0))
    config = mesh_curves.config("dinat_pico", task="classification", strategy="halo", context_parallel="ring")
    with pytest.raises(validate.ConfigError, match="contradicts config.model_kwargs.context_parallel"):
        state_lib.build_model(config, 10, nnx.Rngs(0))


def test_inputs_must_split_over_the_context_axis():
    def check(config):  # config validation on a 4-device mesh, all of it the context axis
        config.mesh.update(data=1, fsdp=1, context=4)
        validate.validate(config, num_devices=4, process_count=1)

    config = mesh_curves.config("dinat_pico", task="classification", strategy="halo")
    config.image_size = 30
    with pytest.raises(validate.ConfigError, match=r"config\.image_size = 30.*divisible by its size 4"):
        check(config)
    config.image_size = 32
    check(config)
    config = mesh_curves.config("softmax_lm_tiny", strategy="ring")
    config.seq_len = 36
    with pytest.raises(validate.ConfigError, match=r"config\.seq_len = 36.*'ring'.*divisible by 8"):
        check(config)
    config.context_parallel = "ulysses"  # no zigzag: the context size alone divides it
    check(config)
    config.seq_len = 34
    with pytest.raises(validate.ConfigError, match=r"config\.seq_len = 34.*context axis size 4"):
        check(config)

