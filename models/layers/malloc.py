"""`keep_freed_memory()`: make glibc keep large freed blocks for reuse instead of returning them to the OS.

Why: XLA:CPU allocates every buffer of a step afresh (activations, gradients, temporaries; ~100 MB each in
MaxViT's first stage at batch 8) and frees them after. glibc serves blocks that large with `mmap` and unmaps them
on `free`, so each step touches its whole working set in new pages: measured on a MaxViT-T MBConv fwd+bwd
(stride 2, 112 px, batch 8, jitted alone), 189k page faults per call and half of its CPU time in the kernel
(748 -> 435 ms CPU with this setting). On the whole maxvit_tiny train step (batch 8, 2 threads, idle machine):
2.64 -> 2.05 s wall, 4.69 -> 3.53 s CPU. timm's step gains too (PyTorch's CPU tensors use the same allocator), so
`benchmarks/models.py` applies it to both sides.

How: `mallopt` (glibc only; a no-op returning False elsewhere) with one heap arena for all threads, no `mmap`
for large blocks, and no trimming of the heap top. Freed memory then stays in the process (resident memory
does not shrink back after the peak). Call it once, early (before JAX starts its thread pool is best: arenas that
threads already own stay). The same effect from the shell: `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=-1`.

Trimming is switched off with -1 (glibc reads it as the largest size), not with the largest int: a step whose
freed memory reaches the top of the heap in one piece larger than 2 GiB (MaxViT-T at batch 8 does) was trimmed
at that threshold and faulted its whole working set back in on the next step: 1.1M page faults and 5-15 s of
kernel time per step on this project's VMs, against 0 faults and 0.1 s with -1.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc malloc.h


def keep_freed_memory() -> bool:
    """Tunes glibc's malloc as described in the module docstring; True if every setting was accepted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(option, value) == 1 for option, value in settings)
