"""Pallas (TPU Mosaic + GPU) and Triton kernels behind the ops' `implementation='pallas'|'triton'`.

Installed as `jaxattn.kernels`. Kernels import only `jaxattn.core`; the ops in `jaxattn` import kernels lazily.
"""
