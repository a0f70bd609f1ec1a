"""Context parallelism in training: each family with its strategies on a `context > 1` mesh trains exactly like the
same config on `context = 1` (loss and gradient-norm curves on the same fixed data), the config key reaches the
models, and bad combinations fail naming the key.

The 8-device cases run in two child processes (`@pytest.mark.devices(8)`): language models, then vision models.
Each family's `context = 1` reference curve is computed once and shared by its strategies.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxattn.configs import base
from jaxattn.train import state as state_lib
from jaxattn.train import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
RTOL = 1e-5  # fp32: only the order of reductions differs between the meshes
REFERENCE_MESH = {"data": 2, "fsdp": 1, "context": 1}


def _config(model, *, task="lm", strategy="", **model_kwargs):
    c = base.get_config()
    c.task, c.model, c.context_parallel = task, model, strategy
    c.model_kwargs = ml_collections.ConfigDict(model_kwargs)
    c.batch_size = c.eval_batch_size = 4
    c.num_train_steps = STEPS
    c.optimizer.update(warmup_steps=1, learning_rate=1e-2)
    c.input.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    return c


# Tiny members of each family (sizes chosen so the strategies' divisibility rules hold at context 4 / 2).
LM = dict(vocab_size=260, d_model=32, num_layers=1, num_heads=4, glu_dim=48)
# 64 px at context 4: maps of 16 rows (dilation 2) and 8 rows shard with halos, 4 rows run the single-device op.
DINAT = dict(embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 2), mlp_ratio=2.0, kernel_size=3,
             dilations=((2,), (1,), (1,)), img_size=64, drop_path_rate=0.0)


def _halonet_kwargs():
    from jaxattn.models.halonet.config import AttnCfg, stage
    # 32 px at context 4: halo layers see 8x8 (stages 1, 2: rows shard into whole blocks of 2), then 4x4 (the
    # single-device op).
    return dict(stages=[stage("self_attn", 1, c, 1 if i == 0 else 2) for i, c in enumerate((16, 16, 24))],
                stem_chs=8, attn=AttnCfg(block_size=2, halo_size=1, num_heads=2), img_size=32, drop_path_rate=0.0)


def _lm_batches(seq_len, batch=4):
    rng = np.random.default_rng(0)
    return [{"inputs": rng.integers(0, 260, (batch, seq_len), dtype=np.int32),
             "targets": rng.integers(0, 260, (batch, seq_len), dtype=np.int32)} for _ in range(STEPS)]


def _image_batches(size, batch=4):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, (batch,), dtype=np.int32)} for _ in range(STEPS)]


def _curves(config, mesh_axes, batches, num_outputs):
    """`(losses, grad_norms)` of `STEPS` train steps of the real train step on `batches` under `mesh_axes`."""
    from jaxattn.train import optimizer, sharding, tasks, train
    mesh = sharding.make_mesh(mesh_axes, devices=jax.devices()[:math.prod(mesh_axes.values())])
    rules = sharding.logical_rules(config)
    tx, schedule = optimizer.make_optimizer(config, STEPS)
    task = tasks.make_task(config, num_outputs)
    model_def, init, _, state_shardings = state_lib.create(config, num_outputs, tx, mesh, rules)
    step_fn = functools.partial(train.train_step, model_def=model_def, task=task, tx=tx, schedule=schedule,
                                config=config)
    batch_shardings = sharding.batch_shardings(mesh, batches[0], sequence_keys=task.sequence_keys)
    rng_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), model_def.rng_state)
    losses, norms, compiled = [], [], None
    with jax.set_mesh(mesh):
        state = init()
        for batch in batches:
            args = (state, sharding.to_global(batch, batch_shardings), model_def.rng_state)
            if compiled is None:
                jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, rng_sharding),
                                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
                compiled = train.compile_step(jitted, args, fast=True)
            state, metrics = compiled(*args)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
    return np.array(losses), np.array(norms)


def _assert_same_curves(name, got, want):
    for what, g, w in zip(("loss", "grad_norm"), got, want):
        assert np.all(np.isfinite(g)), (name, what, g)
        np.testing.assert_allclose(g, w, rtol=RTOL, err_msg=f"{name}: {what} curve differs from context=1")


def _compare_family(cases, batches, num_outputs, context_mesh):
    """`cases`: `[(name, config)]` of one family. The reference is the first config on `context = 1`, where every
    layer runs its single-device op (the strategy only changes how a layer runs, never the model)."""
    want = _curves(cases[0][1], REFERENCE_MESH, batches, num_outputs)
    for name, config in cases:
        _assert_same_curves(name, _curves(config, context_mesh, batches, num_outputs), want)


@pytest.mark.devices(8)
def test_language_models_train_alike_on_context_meshes(tmp_path, monkeypatch):
    context4 = {"data": 2, "fsdp": 1, "context": 4}
    batches = _lm_batches(32)
    softmax = [(f"softmax_lm/{s}", _config("softmax_lm_tiny", strategy=s, **LM))
               for s in ("ring", "allgather", "ulysses")]
    _compare_family(softmax, batches, 260, context4)
    transnormer = [("transnormer/lasp2", _config("transnormer_tiny", strategy="lasp2", block_size=4, **LM))]
    _compare_family(transnormer, batches, 260, context4)
    _run_main_with_context(tmp_path, monkeypatch)


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
    c = _config(model, task="classification", strategy="halo", **model_kwargs)
    c.image_size = image_size
    return c


def _rows_sharded(config, layers, mesh_axes):
    """Which attention layers (`layers(model)` -> `[(layer, rows)]`) run the halo strategy on `mesh_axes`."""
    from jaxattn.train import sharding
    model = nnx.eval_shape(lambda: state_lib.build_model(config, 10, nnx.Rngs(0)))
    with jax.set_mesh(sharding.make_mesh(mesh_axes, devices=jax.devices()[:math.prod(mesh_axes.values())])):
        return [layer.shards_rows(rows) for layer, rows in layers(model)]


@pytest.mark.devices(8)
def test_vision_models_train_alike_on_context_meshes():
    context4 = {"data": 2, "fsdp": 1, "context": 4}
    dinat = _vision_config("dinat_pico", 64, **DINAT)
    assert _rows_sharded(dinat, lambda m: [(lv.blocks[0].attn, r) for lv, r in zip(m.levels, (16, 8, 4))],
                         context4) == [True, True, False]
    _compare_family([("dinat/halo", dinat)], _image_batches(64), 10, context4)
    halonet = _vision_config("halonet_pico", 32, **_halonet_kwargs())
    assert _rows_sharded(halonet, lambda m: [(s[0].self_attn, r) for s, r in zip(m.stages, (8, 8, 4))],
                         context4) == [True, True, False]
    _compare_family([("halonet/halo", halonet)], _image_batches(32), 10, context4)


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
    config = _config("softmax_lm_tiny", strategy="ulysses", **LM)
    model = nnx.eval_shape(lambda: state_lib.build_model(config, 260, nnx.Rngs(0)))
    assert {segment.template.mixer.context_parallel for segment in model.segments} == {"ulysses"}
    config.context_parallel = "lasp2"
    with pytest.raises(validate.ConfigError, match=r"config\.context_parallel = 'lasp2'.*softmax_lm.*'ring'"):
        state_lib.build_model(config, 260, nnx.Rngs(0))
    config = _config("maxvit_pico", task="classification", strategy="halo")
    with pytest.raises(validate.ConfigError, match=r"config\.context_parallel = 'halo'.*maxvit.*no context"):
        state_lib.build_model(config, 10, nnx.Rngs(0))
    config = _config("dinat_pico", task="classification", strategy="halo", context_parallel="ring")
    with pytest.raises(validate.ConfigError, match="contradicts config.model_kwargs.context_parallel"):
        state_lib.build_model(config, 10, nnx.Rngs(0))


def test_inputs_must_split_over_the_context_axis():
    def check(config):  # config validation on a 4-device mesh, all of it the context axis
        config.mesh.update(data=1, fsdp=1, context=4)
        validate.validate(config, num_devices=4, process_count=1)

    config = _config("dinat_pico", task="classification", strategy="halo")
    config.image_size = 30
    with pytest.raises(validate.ConfigError, match=r"config\.image_size = 30.*divisible by its size 4"):
        check(config)
    config.image_size = 32
    check(config)
    config = _config("softmax_lm_tiny", strategy="ring")
    config.seq_len = 36
    with pytest.raises(validate.ConfigError, match=r"config\.seq_len = 36.*'ring'.*divisible by 8"):
        check(config)
    config.context_parallel = "ulysses"  # no zigzag: the context size alone divides it
    check(config)
    config.seq_len = 34
    with pytest.raises(validate.ConfigError, match=r"config\.seq_len = 34.*context axis size 4"):
        check(config)

