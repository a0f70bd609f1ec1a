"""TPU chips (per chip, from Google Cloud's TPU documentation; see `../shared/reference/pods.md`) and the devices of
a TPU slice by its libtpu topology name, for compiling without a TPU (deviceless, `jax.experimental.topologies`).
"""
from __future__ import annotations

import dataclasses
import os

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    hbm_bytes_per_s: float
    peak_bf16_flops_per_s: float
    ici_bytes_per_s: float  # per chip, all links together


# v4's ICI: 6 links of 50 GB/s (the TPU v4 paper, Jouppi et al. 2023); the others from the Cloud TPU pages.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 1.2e12, 275e12, 2.4e12 / 8),
    "v5e": Chip("TPU v5e", 16 * GIB, 0.819e12, 197e12, 1.6e12 / 8),
    "v5p": Chip("TPU v5p", 95 * GIB, 2.765e12, 459e12, 4.8e12 / 8),
    "v6e": Chip("TPU v6e", 32 * GIB, 1.64e12, 918e12, 3.584e12 / 8),
}


class TopologyError(ValueError):
    """A topology name that libtpu does not know (the message names `--topology`)."""


def chip_of(topology: str) -> Chip:
    prefix = topology.partition(":")[0]
    if prefix not in CHIPS:
        raise TopologyError(f"--topology={topology!r}: the chip must be one of {', '.join(CHIPS)} "
                            f"('<chip>:<AxB[xC]>', e.g. v5p:4x4x4, v5e:8x8)")
    return CHIPS[prefix]


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice (abstract: compile-only), from libtpu without a TPU."""
    chip_of(topology)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes here may hold libtpu too
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001 - libtpu raises several types for a bad name; all mean the same
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TopologyError(f"--topology={topology!r} is not a TPU topology libtpu can compile for ({detail}); "
                            f"needs the `tpu` extra (`pip install -e '.[tpu]'`)") from None
