"""The training loop end to end with a tiny model: outputs, resume after SIGKILL / SIGTERM (bit-identical), the
non-finite guard, a damaged checkpoint, bad config values, and two processes against one."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_config
from jaxattn.train import metrics, train
from train_helpers import Output, cli, run_cli

DELAY = 0.15  # seconds per step of the tiny model: room to signal a running process


def _config(tfds_dir, arg=None, **overrides):
    c = tiny_config.get_config(arg)
    c.data_dir = tfds_dir
    if arg is None:
        c.model_kwargs.delay = DELAY
    c.update(overrides)
    return c


def _cli_args(tfds_dir, workdir, *extra):
    return ["--config", os.path.join(os.path.dirname(tiny_config.__file__), "tiny_config.py"),
            "--workdir", str(workdir), f"--config.data_dir={tfds_dir}", f"--config.model_kwargs.delay={DELAY}",
            *extra]


def _params(workdir, step):
    """The saved parameters of `step`, as flat numpy arrays."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:  # as host numpy arrays, whatever mesh wrote them
        meta = checkpointer.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early (exit code {proc.returncode})")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tfds_dir, tmp_path_factory):
    """One uninterrupted 12-step run; the other tests compare against it."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train.train_and_evaluate(_config(tfds_dir), workdir)
    return workdir, result


def test_run_writes_metrics_tensorboard_curves_and_checkpoints(reference):
    workdir, result = reference
    records = metrics.read_metrics(workdir)
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [2, 3, 4, 6, 8, 9, 10, 12]  # every log_every, and before each save
    first = next(r for r in records if "train/loss" in r)
    assert {"train/loss", "train/lr", "train/examples_per_s", "train/grad_norm", "train/accuracy"} <= first.keys()
    assert [r["step"] for r in records if "eval/accuracy" in r] == [6, 12]
    assert 0.0 <= result["eval/accuracy"] <= 1.0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert os.path.getsize(os.path.join(workdir, metrics.CURVES_FILE)) > 1000
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [6, 9, 12]


def test_resume_after_sigkill_and_sigterm_is_bit_identical(tfds_dir, reference, tmp_path):
    """Killed (SIGKILL) anywhere after the first checkpoint, re-run, preempted (SIGTERM: saves and exits 0),
    re-run to the end: the final parameters equal the uninterrupted run's, bit for bit."""
    ref_dir, _ = reference
    workdir = tmp_path / "interrupted"
    proc = cli(_cli_args(tfds_dir, workdir))
    output = Output(proc)
    _wait_for(lambda: (workdir / "checkpoints" / "3").exists(), proc)
    time.sleep(random.uniform(0.0, 3 * DELAY))  # anywhere: mid-step, mid-save
    proc.send_signal(signal.SIGKILL)
    output.finish()
    restart = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert restart < 12

    proc = cli(_cli_args(tfds_dir, workdir))
    output = Output(proc)
    progressed = lambda: any(line.startswith("step ") and int(line.split()[1].split("/")[0]) > restart
                             for line in list(output.lines))
    _wait_for(progressed, proc)  # this run has resumed and trained past the checkpoint
    proc.send_signal(signal.SIGTERM)
    out = output.finish()
    assert proc.returncode == 0 and "SIGTERM: saved step" in out, out
    preempted = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert restart < preempted < 12

    code, out = run_cli(_cli_args(tfds_dir, workdir))
    assert code == 0, out
    _assert_identical(_params(workdir, 12), _params(ref_dir, 12))
    steps = [r["step"] for r in metrics.read_metrics(str(workdir)) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no duplicated lines from the interrupted runs


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tfds_dir, reference, tmp_path, caplog):
    ref_dir, _ = reference
    workdir = str(tmp_path / "damaged")
    shutil.copytree(ref_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    latest = os.path.join(workdir, "checkpoints", "12", "state")
    for root, _, files in os.walk(latest):  # truncate every array file of the latest step
        for f in files:
            if not f.endswith(".json") and "_METADATA" not in f:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(max(os.path.getsize(fh.name) // 3, 1))
    result = train.train_and_evaluate(_config(tfds_dir), workdir)
    assert "step 12" in caplog.text and "cannot be restored" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "12.corrupt"))
    _assert_identical(_params(workdir, 12), _params(ref_dir, 12))
    assert 0.0 <= result["eval/accuracy"] <= 1.0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tfds_dir, tmp_path):
    config = _config(tfds_dir, log_every=2, checkpoint_every=3)
    config.model_kwargs.update(delay=0.0, poison_after=4)  # step 5 produces NaN logits
    with pytest.raises(train.NonFiniteLossError, match=r"at step 5.*checkpoint \(step 3\).*is kept"):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert all(np.isfinite(v).all() for v in _params(str(tmp_path), 3).values())


def test_bad_config_values_fail_with_a_clear_message(tfds_dir, tmp_path):
    code, out = run_cli(_cli_args(tfds_dir, tmp_path, "--config.batch_size=12", "--config.mesh.data=3"))
    assert code == 1
    assert "config.mesh" in out and "needs 3 devices, but there are 1" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tfds_dir, tmp_path):
    """Two processes (one CPU device each, gloo collectives) against one process with two devices, same global
    batch and mesh: the loss curves agree and the final parameters are the same."""
    common = ["--config.model_kwargs.delay=0", "--config.num_train_steps=6", "--config.eval_every=0",
              "--config.log_every=1"]
    single = cli(_cli_args(tfds_dir, tmp_path / "single", *common, "--cpu_devices=2"))
    address = f"127.0.0.1:{_free_port()}"
    procs = [cli(_cli_args(tfds_dir, tmp_path / "multi", *common, f"--coordinator_address={address}",
                           "--num_processes=2", f"--process_id={i}"), module="jaxattn.train.main") for i in range(2)]
    outputs = [Output(p) for p in [single, *procs]]
    for out in outputs:
        text = out.finish(timeout=300)
        assert out.proc.returncode == 0, text
    curve = lambda d: [r["train/loss"] for r in metrics.read_metrics(str(d)) if "train/loss" in r]
    one, two = curve(tmp_path / "single"), curve(tmp_path / "multi")
    assert len(one) == 6
    np.testing.assert_allclose(two, one, rtol=1e-6)
    a, b = _params(str(tmp_path / "single"), 6), _params(str(tmp_path / "multi"), 6)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert json.loads((tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_byte_level_lm_reports_bits_per_byte(tfds_dir, tmp_path):
    config = _config(tfds_dir, "lm", num_train_steps=30, log_every=10, eval_every=0)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=3)
    result = train.train_and_evaluate(config, str(tmp_path))
    records = [r for r in metrics.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert {"train/bits_per_byte", "train/tokens_per_s"} <= records[-1].keys()
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    # Uniform guessing is 8 bits per byte; a few steps of a tiny model already learn byte frequencies.
    assert 2.0 < result["eval/bits_per_byte"] < 7.0
    np.testing.assert_allclose(result["eval/bits_per_byte"], result["eval/loss"] / np.log(2), rtol=1e-6)
