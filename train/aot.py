"""Compile the real train step for a TPU slice on this machine (no TPU) and report what it needs per device.

    python -m train.aot --config configs/transnormer.py:7b_lm1b --topology v5p:4x4x4 \
        --config.seq_len=8192 --config.dtype=bfloat16 --config.remat=full [--json out.json]
    jaxattn-aot --config configs/maxvit.py:large_imagenet --topology v6e:8x8 --config.image_size=512 ...

The mesh is `config.mesh` over the slice's devices (libtpu's deviceless topology, `train/aot_chips.py`); the steps
are `train.steps.build_steps`, exactly what `train.main` runs (model, optimizer, state shardings, donation); the
inputs are `ShapeDtypeStruct`s of the pipeline's batches (`steps.batch_spec`): nothing is loaded, no `data_dir`,
no weights. Classes, image size, vocabulary and sequence length come from the config.

Reported (`--json` writes exactly these keys):
- `memory_per_device`: `compiled.memory_analysis()` of the train step (arguments, outputs, temporaries, aliased
  = donated); `fits` is `arguments + outputs + temporaries - aliased <= hbm_per_device` (the chip table).
- `flops_per_step` (all devices): XLA's cost analysis of the per-device program x devices, corrected for loops
  (the analysis counts a `while` body once; the dot/convolution FLOPs and the Mosaic kernels' `pl.CostEstimate`
  FLOPs of the extra trips are added from the HLO, `train/aot_hlo.py`); the HBM bytes (not a key, used below): XLA's `bytes accessed` scaled by the HLO's traffic
  estimate with loop trips over that without.
- `model_flops_per_step`: analytic (`train/aot_flops.py`: `6 N D` plus attention).
- `collective_bytes_per_device`: the data of every all-gather, reduce-scatter, all-reduce, all-to-all and
  collective-permute in the compiled HLO, per step.
- `step_time_lower_bound_s = max(flops_per_device / peak_bf16, hbm_bytes_per_device / hbm_bandwidth)
  + collective_bytes_per_device / ici_bandwidth`: a roofline with no overlap of communication.
- `compile_seconds`: wall time of the train step's (and eval step's) compile on this host.

Exit status 0 when the step compiled, fitting or not; 2 with a one-line error naming the setting for an unknown
topology, a mesh that does not match the slice, or a sharding that does not divide; 3 with `fits: false` and
XLA's shortfall when XLA:TPU itself refuses to compile a step that needs more HBM than the chip has (it then
reports no memory breakdown and no JSON).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (`path.py` or `path.py:variant`).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "libtpu topology name: v5p:4x4x4, v5e:8x8, v6e:4x4, v4:2x2x2.")
_JSON = flags.DEFINE_string("json", None, "Write the report (exactly the documented keys) to this path.")
_HLO = flags.DEFINE_string("hlo", None, "Write the compiled train step's HLO text to this path (for the counters).")
_EVAL = flags.DEFINE_bool("eval_step", True, "Also compile eval_step (its time is part of compile_seconds).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.WARNING)
    from . import aot_report  # after flags: configs are read before JAX starts
    try:
        report, details = aot_report.compile_report(_CONFIG.value, _TOPOLOGY.value, eval_step=_EVAL.value,
                                                    hlo_path=_HLO.value)
    except ValueError as e:  # ConfigError, TopologyError, shardings that do not divide
        print(f"error: {aot_report.first_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - XLA's own refusal, below; anything else is a real failure
        shortfall = aot_report.out_of_memory(e)
        if shortfall is None:
            raise
        print(f"fits: false ({shortfall}); XLA refuses to compile a program that needs more HBM than the chip has",
              flush=True)
        print(f"error: does not fit: {shortfall}", file=sys.stderr)
        return 3
    print(aot_report.format_report(report, details), flush=True)
    if _JSON.value:
        aot_report.write_json(report, _JSON.value)
    return 0


def run(argv=None):
    """Console entry point (`jaxattn-aot`)."""
    flags.mark_flag_as_required("config")
    flags.mark_flag_as_required("topology")
    app.run(lambda args: sys.exit(main(args)), argv=argv if argv is not None else sys.argv)


if __name__ == "__main__":
    run()
