"""The report of `train.aot` (the command line is `train/aot.py`, whose docstring says what each key means):
`compile_report(config, topology)` compiles the train step (and eval step) for a TPU slice and measures it.
No flags are defined here, so tests and scripts can import it beside `train.main`.
"""
from __future__ import annotations

import json
import re
import time

KEYS = ("topology", "device_kind", "num_devices", "mesh", "memory_per_device", "hbm_per_device", "fits",
        "flops_per_step", "model_flops_per_step", "collective_bytes_per_device", "step_time_lower_bound_s",
        "compile_seconds")


def compile_report(config, topology: str, *, eval_step: bool = True, hlo_path: str | None = None
                   ) -> tuple[dict, dict]:
    """`(report, details)`: the report's `KEYS`, and what the table prints besides (kernels, eval memory, ...).
    Raises `ValueError` (ConfigError, TopologyError) naming the setting for what cannot compile."""
    from . import aot_chips
    chip = aot_chips.chip_of(topology)  # before anything heavy is imported

    import jax

    from . import aot_flops, aot_hlo, sharding, steps as steps_lib, validate

    devices = aot_chips.topology_devices(topology)
    validate.validate(config, num_devices=len(devices), process_count=1)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    num_outputs, train_examples = steps_lib.dataset_facts(config)
    # the schedule's length is a constant of the program, not its shapes
    steps = steps_lib.build_steps(config, mesh, num_outputs, steps_lib.total_train_steps(config, train_examples))
    train_batch = steps.abstract_batch(steps_lib.batch_spec(config, train=True))
    rng_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             steps.model_def.rng_state, steps.rng_sharding)
    model_flops = aot_flops.model_flops_per_step(config, steps, train_batch)  # before the long compile
    details = {}
    with jax.set_mesh(mesh):
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            compiled = steps_lib.compile_step(steps.jit_train_step(steps.batch_shardings(train_batch)),
                                              (steps.abstract_state, train_batch, rng_state),
                                              fast=config.compile_fast)
        except ValueError as e:  # shardings that do not divide are found while lowering
            raise validate.ConfigError(f"config.mesh = {dict(mesh.shape)!r}: {first_line(e)}") from None
        seconds = time.perf_counter() - start
        details["train_compile_cpu_seconds"] = time.process_time() - cpu_start
        if eval_step:
            eval_batch = steps.abstract_batch(steps_lib.batch_spec(config, train=False))
            state = steps.abstract_state
            params = state.ema_params if state.ema_params is not None else state.params
            start = time.perf_counter()
            eval_compiled = steps_lib.compile_step(steps.eval_step, (params, state.model_state, eval_batch,
                                                                     rng_state), fast=config.compile_fast)
            details["eval_compile_seconds"] = time.perf_counter() - start
            details["eval_peak_bytes"] = peak_bytes(memory_per_device(eval_compiled))
            seconds += details["eval_compile_seconds"]
    details["train_compile_seconds"] = seconds - details.get("eval_compile_seconds", 0.0)

    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    module = aot_hlo.parse(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    in_loops = (aot_hlo.matmul_flops(module) - aot_hlo.matmul_flops(module, loops=False)
                + aot_hlo.kernel_flops(module) - aot_hlo.kernel_flops(module, loops=False))
    flops_per_device = float(cost.get("flops", 0.0)) + in_loops
    once = aot_hlo.memory_bytes(module, loops=False)
    hbm_bytes = float(cost.get("bytes accessed", 0.0)) * (aot_hlo.memory_bytes(module) / once if once else 1.0)
    collectives = aot_hlo.collective_bytes(module)
    collective_bytes = sum(collectives.values())
    memory = memory_per_device(compiled)
    compute_s = flops_per_device / chip.peak_bf16_flops_per_s
    hbm_s = hbm_bytes / chip.hbm_bytes_per_s
    report = {
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "memory_per_device": memory,
        "hbm_per_device": chip.hbm_bytes,
        "fits": peak_bytes(memory) <= chip.hbm_bytes,
        "flops_per_step": flops_per_device * len(devices),
        "model_flops_per_step": model_flops,
        "collective_bytes_per_device": collective_bytes,
        "step_time_lower_bound_s": max(compute_s, hbm_s) + collective_bytes / chip.ici_bytes_per_s,
        "compile_seconds": seconds,
    }
    details.update(collectives=collectives, compute_s=compute_s, hbm_s=hbm_s, hbm_bytes_per_device=hbm_bytes,
                   xla_flops_per_device=float(cost.get("flops", 0.0)), loop_flops_per_device=in_loops,
                   matmul_flops_per_device=aot_hlo.matmul_flops(module), chip=chip,
                   kernels=aot_hlo.kernel_calls(module), kernel_flops_per_device=aot_hlo.kernel_flops(module),
                   implementation=config.model_kwargs.get("implementation", None))
    return report, details


def memory_per_device(compiled) -> dict:
    stats = compiled.memory_analysis()
    return {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
            "temporaries": int(stats.temp_size_in_bytes), "aliased": int(stats.alias_size_in_bytes)}


def peak_bytes(memory: dict) -> int:
    return memory["arguments"] + memory["outputs"] + memory["temporaries"] - memory["aliased"]


_OOM = re.compile(r"RESOURCE_EXHAUSTED: [^\n]*?(Ran out of memory[^\n]*)")


def out_of_memory(e: BaseException) -> str | None:
    """The shortfall XLA:TPU names when it refuses a program larger than HBM (`RESOURCE_EXHAUSTED: Ran out of
    memory ...`), else None."""
    match = _OOM.search(str(e))
    return match.group(1).strip().rstrip(".") if match else None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if abs(n) >= 2 ** 28 else f"{n / 2 ** 20:.2f} MiB"


def format_report(report: dict, details: dict) -> str:
    """The printed table: the report plus its parts (memory, FLOPs by source, collectives, roofline terms,
    kernels, compile times)."""
    m, hbm, chip = report["memory_per_device"], report["hbm_per_device"], details["chip"]
    peak = peak_bytes(m)
    ratio = report["flops_per_step"] / max(report["model_flops_per_step"], 1.0)
    mfu = report["model_flops_per_step"] / (report["step_time_lower_bound_s"] * chip.peak_bf16_flops_per_s
                                            * report["num_devices"])
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items() if v > 1) or "one device"
    kernels = ", ".join(f"{k} x{v}" for k, v in sorted(details["kernels"].items())) or "none (XLA code only)"
    ici_s = report["collective_bytes_per_device"] / chip.ici_bytes_per_s
    compile_text = (f"{report['compile_seconds']:.1f} s wall (train {details['train_compile_seconds']:.1f} s, "
                    f"{details['train_compile_cpu_seconds']:.0f} CPU s")
    if "eval_compile_seconds" in details:
        compile_text += f"; eval {details['eval_compile_seconds']:.1f} s, peak {_gib(details['eval_peak_bytes'])}"
    rows = [
        ("slice", f"{report['topology']} ({report['num_devices']} x {report['device_kind']}), mesh {mesh}"),
        ("memory / device", f"{_gib(peak)} of {_gib(hbm)} HBM (arguments {_gib(m['arguments'])}, outputs "
                            f"{_gib(m['outputs'])}, temporaries {_gib(m['temporaries'])}, aliased "
                            f"{_gib(m['aliased'])})"),
        ("fits", "true" if report["fits"] else
         f"false: short by {_gib(peak - hbm)} per device ({_gib(peak)} needed, {_gib(hbm)} HBM)"),
        ("FLOPs / step", f"{report['flops_per_step']:.3e} compiled, {report['model_flops_per_step']:.3e} model "
                         f"({ratio:.2f}x); per device XLA {details['xla_flops_per_device']:.3e} + loop trips "
                         f"{details['loop_flops_per_device']:.3e} (dots and convolutions "
                         f"{details['matmul_flops_per_device']:.3e})"),
        ("collectives / device", f"{_gib(report['collective_bytes_per_device'])} ("
         + (", ".join(f"{k} {_gib(v)}" for k, v in sorted(details["collectives"].items())) or "none") + ")"),
        ("step time >=", f"{report['step_time_lower_bound_s']:.4g} s = max(compute {details['compute_s']:.4g} s, "
                         f"HBM {details['hbm_s']:.4g} s) + ICI {ici_s:.4g} s; MFU bound {100 * mfu:.1f}%"),
        ("attention", f"implementation={details['implementation']!r} asked; Mosaic kernels compiled: {kernels}"),
        ("compile", compile_text + ")"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(report: dict, path: str) -> None:
    """Writes exactly `KEYS` of `report` to `path`."""
    with open(path, "w") as f:
        json.dump({k: report[k] for k in KEYS}, f, indent=1)
