"""Helpers of the training tests: running the command line in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(args, **popen) -> subprocess.Popen:
    """Starts `python -m train.main ARGS` from the repository root."""
    return subprocess.Popen([sys.executable, "-m", "train.main", *args], cwd=ROOT, env=popen.pop("env", None) or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_cli(args, *, timeout=300) -> tuple[int, str]:
    proc = cli(args)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out
