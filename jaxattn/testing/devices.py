"""Run code with N forced host CPU devices, in a fresh interpreter so the parent's JAX is unaffected."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

DEVICE_COUNT_ENV = "JAXATTN_FORCED_DEVICES"


def device_env(n: int, env: dict | None = None) -> dict:
    """Environment for a child process that sees `n` CPU devices.

    The child compiles with XLA:CPU's backend (LLVM) optimisations off unless `XLA_FLAGS` sets a level: these
    processes check values and shardings of small programs, where compile time dominates.
    """
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if not any("xla_backend_optimization_level" in f for f in flags):
        flags.append("--xla_backend_optimization_level=0")
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[DEVICE_COUNT_ENV] = str(n)
    return env


def run_with_devices(n: int, code: str, *, timeout: float = 600, cwd: str | None = None) -> str:
    """Runs Python `code` with `n` host devices; returns stdout, raises with the child's output on failure."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=device_env(n), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"child with {n} devices failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
