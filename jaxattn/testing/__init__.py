"""Test utilities shared by every op, kernel and model test (and usable by downstream projects).

- `compare`: an implementation against a reference, outputs and gradients, with tolerances stated once.
- `lowering`: that a function lowers for TPU (Mosaic) or CUDA (Mosaic GPU / Triton) from a CPU-only machine.
- `devices`: running code with N forced host CPU devices in a fresh subprocess.
"""
from jaxattn.testing.compare import TOLERANCES, assert_allclose, assert_matches_reference, random_inputs
from jaxattn.testing.devices import run_with_devices
from jaxattn.testing.lowering import assert_lowers, lowered_text

__all__ = [
    "TOLERANCES", "assert_allclose", "assert_matches_reference", "random_inputs",
    "run_with_devices", "assert_lowers", "lowered_text",
]
