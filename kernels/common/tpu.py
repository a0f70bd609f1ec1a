"""The TPU generations the kernels plan their tiles for: one table of what a tile must fit (VMEM) and fill (MXU),
and how a generation is recognised from a JAX device kind.

Per TensorCore (the unit a Mosaic kernel runs on):
| generation | device kinds                 | VMEM    | Mosaic's default scoped limit | MXU            |
|------------|------------------------------|---------|-------------------------------|----------------|
| v4         | 'TPU v4'                     | 16 MiB  | 16 MiB                        | 4 x 128 x 128  |
| v5e        | 'TPU v5 lite', 'TPU v5e'     | 128 MiB | 16 MiB                        | 4 x 128 x 128  |
| v5p        | 'TPU v5', 'TPU v5p'          | 64 MiB  | 16 MiB                        | 4 x 128 x 128  |
| v6e        | 'TPU v6 lite', 'TPU v6e'     | 128 MiB | 32 MiB                        | 2 x 256 x 256  |

- VMEM and MXU figures: `jax._src.pallas.mosaic.tpu_info` (jax 0.10.2) and the Cloud TPU system-architecture
  pages. The device kinds are what `jax.devices()` reports on the chips and what libtpu's deviceless topologies
  (`jax.experimental.topologies.get_topology_desc`) report here ('TPU v5 lite' for v5e, 'TPU v6 lite' for v6e).
- The scoped limit is the VMEM a kernel may use when its `vmem_limit_bytes` is not set; checked with the real
  compiler (libtpu 0.0.42.1, deviceless): a pipelined kernel with 4 x 5 MiB of blocks fails with
  `CompileTimeScopedVmemOom` on v5e and v5p and compiles on v6e; 4 x 9 MiB fails on v6e; raising
  `vmem_limit_bytes` lifts it up to the physical VMEM (v5p reports 63.94 MiB usable of its 64; v4's limit cannot
  exceed its 16 MiB).
- Tile plans are checked against `vmem_budget_bytes`: three quarters of the default scoped limit (the kernels
  run under it, without raising it), leaving the rest to Mosaic's internal scratch and to temporaries a plan's
  count misses. `vmem_limit_bytes` (three quarters of the physical VMEM, never below the default) is what a
  kernel would pass as `vmem_limit_bytes` if it needed more.

When the generation is not known (a 'tpu' kernel traced on a host without a TPU mesh in context), kernels plan for
`UNKNOWN`: the 128-wide MXU and the 16 MiB every generation accepts without raising the limit. Such plans compile
on all four generations.
"""
from __future__ import annotations

import dataclasses

import jax

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation, per TensorCore."""
    name: str
    device_kinds: tuple[str, ...]
    vmem_bytes: int  # physical VMEM
    scoped_vmem_bytes: int  # what a kernel gets without `vmem_limit_bytes`
    mxu: int  # side of one MXU (its systolic array is `mxu x mxu`)
    mxus: int  # MXUs per TensorCore

    @property
    def vmem_budget_bytes(self) -> int:
        """VMEM a tile plan may fill (its blocks, scratch and temporaries) under the default scoped limit."""
        return self.scoped_vmem_bytes * 3 // 4

    @property
    def vmem_limit_bytes(self) -> int:
        """A `vmem_limit_bytes` for kernels that need more than the default (Mosaic accepts up to the physical)."""
        return max(self.scoped_vmem_bytes, self.vmem_bytes * 3 // 4)


GENERATIONS = {
    g.name: g for g in (
        Generation("v4", ("TPU v4",), 16 * MiB, 16 * MiB, 128, 4),
        Generation("v5e", ("TPU v5 lite", "TPU v5e"), 128 * MiB, 16 * MiB, 128, 4),
        Generation("v5p", ("TPU v5", "TPU v5p"), 64 * MiB, 16 * MiB, 128, 4),
        Generation("v6e", ("TPU v6 lite", "TPU v6e"), 128 * MiB, 32 * MiB, 256, 2),
    )
}
UNKNOWN = Generation("unknown", (), 16 * MiB, 16 * MiB, 128, 4)
LANES = 128  # minor dimension of a vreg (every generation)
SUBLANES = 8  # second-minor dimension of a 32-bit vreg; 16-bit types pack 16 rows


def generation_of(device_kind: str) -> str | None:
    """'v5e' for 'TPU v5 lite', ...; None for any other device kind (CPU, GPU, TPU generations not in the table)."""
    for g in GENERATIONS.values():
        if device_kind in g.device_kinds:
            return g.name
    return None


def lowering_device_kind() -> str:
    """The device kind of the program being traced: the abstract mesh's in context (`jax.set_mesh` with the devices
    of a TPU slice), else the default device's (as `pltpu.get_tpu_info` reads it)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None:
        return device.device_kind
    default = jax.config.jax_default_device
    if default is None:
        return jax.devices()[0].device_kind
    return default.device_kind if hasattr(default, "device_kind") else jax.devices(default)[0].device_kind


def current_generation() -> str | None:
    """The generation of the program being traced ('v4', 'v5e', 'v5p', 'v6e'), or None when it is not one of them."""
    return generation_of(lowering_device_kind())


def plan(generation: str | None = None) -> Generation:
    """The table row for `generation` (default: `current_generation()`); `UNKNOWN` when there is none."""
    if generation is None:
        generation = current_generation()
        return GENERATIONS[generation] if generation else UNKNOWN
    if generation not in GENERATIONS:
        raise ValueError(f"`generation` must be one of {tuple(GENERATIONS)} or None, got {generation!r}")
    return GENERATIONS[generation]
