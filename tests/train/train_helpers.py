"""Helpers of the training tests: running the command line in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(args, *, module: str = "train.main") -> subprocess.Popen:
    """Starts `python -m train.main ARGS` from the repository root (stdout and stderr together)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class Output:
    """Collects a process's output lines in the background, so a test can wait for one while it runs."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self._thread.start()

    def text(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout=120) -> str:
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return self.text()


def run_cli(args, *, timeout=300) -> tuple[int, str]:
    proc = cli(args)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out
