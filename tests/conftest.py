"""Shared pytest setup.

- `@pytest.mark.devices(n)`: the test body runs in a child pytest process that sees `n` forced host CPU devices
  (the parent's JAX keeps its single device). Inside the child the mark is a no-op.
- Hypothesis: no deadline (JIT compiles are slow on 2 cores); example counts kept small for CI.
- libtpu (the test extra installs it, for the deviceless TPU compiles): `ALLOW_MULTIPLE_LIBTPU_LOAD=1`, since
  every xdist worker and every `devices(n)` child loads it and libtpu's lockfile otherwise refuses the second.
"""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from jaxattn.testing.devices import DEVICE_COUNT_ENV, device_env  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=12, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("devices")
    if marker is None:
        return None
    n = int(marker.args[0])
    if os.environ.get(DEVICE_COUNT_ENV) == str(n):
        return None  # already in the child: run the test normally
    cmd = [sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=device_env(n), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"test failed with {n} host devices:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}",
                    pytrace=False)
    return True
