"""Command line of training: flags only. The loop is `train.train_and_evaluate`.

    python -m train.main --config configs/maxvit.py [--workdir DIR] [--config.key=value ...]
    python -m train.main --config configs/maxvit.py:tiny_imagenet --config.data_dir=/data/tfds
    jaxattn-train --config configs/maxvit.py            # the installed console script

Several processes: on a cluster (SLURM, Open MPI, TPU pods, `JAX_COORDINATOR_ADDRESS` set) `jax.distributed` is
initialised automatically; locally pass `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`
to each process (CPU collectives use gloo). Re-running the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (`path.py` or `path.py:variant`).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and plots go here "
                               "(default: workdirs/<config file name>[_<variant>]).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for local multi-process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Number of host CPU devices to expose (testing meshes).")
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory", True, "Tune glibc malloc to reuse freed blocks instead of unmapping them "
    "(jaxattn.models.layers.malloc; removes per-step page faults on CPU, ~25% of a MaxViT-T step).")

_CLUSTER_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _multi_process_environment() -> bool:
    for name in _CLUSTER_HINTS:
        value = os.environ.get(name, "")
        if name == "JAX_COORDINATOR_ADDRESS" and value:
            return True
        if name == "TPU_WORKER_HOSTNAMES" and "," in value:
            return True
        if value.isdigit() and int(value) > 1:
            return True
    return False


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, cpu_devices=None):
    """Sets up JAX before its backends start: CPU device count, gloo collectives, `jax.distributed`."""
    import jax
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    explicit = coordinator_address is not None
    if explicit or _multi_process_environment():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if explicit:
            if num_processes is None or process_id is None:
                raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
        else:
            jax.distributed.initialize()


def _default_workdir(argv_config: str) -> str:
    path, _, variant = argv_config.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("workdirs", f"{name}_{variant}" if variant else name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # JAX, TFDS and orbax are chatty at INFO
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger(__package__ or "train").setLevel(logging.INFO)  # ours: resume and preemption notices
    if _KEEP_FREED_MEMORY.value:  # before JAX's thread pool starts, so that every thread shares the tuned arena
        from jaxattn.models.layers.malloc import keep_freed_memory
        keep_freed_memory()
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _CPU_DEVICES.value)
    from . import train, validate
    workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["config"].config_filename)
    try:
        result = train.train_and_evaluate(_CONFIG.value, workdir)
    except (train.NonFiniteLossError, validate.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result:
        print("final: " + " ".join(f"{k}={v:.4f}" for k, v in result.items()), flush=True)
    return 0


def run(argv=None):
    """Console entry point (`jaxattn-train`)."""
    flags.mark_flag_as_required("config")
    app.run(lambda args: sys.exit(main(args)), argv=argv if argv is not None else sys.argv)


if __name__ == "__main__":
    run()
