"""What a compiled XLA program does per step, read from its HLO text: collective bytes, matmul FLOPs, kernel calls.

Every count is per device (the text is the SPMD-partitioned program of one device) and per step: a computation
runs as often as its callers run it, `while` bodies once per trip. XLA's own `cost_analysis()` counts a loop body
once, whatever its trip count; `matmul_flops(..., loops=False)` reproduces that convention, so the difference of
the two is what a cost analysis misses in loops (`train.aot` adds it).

- Collectives: all-gather, reduce-scatter, all-reduce, all-to-all, ragged-all-to-all, collective-permute and
  their asynchronous `-start` forms (never `-done`). A collective's bytes are its data only: the gathered result
  of an all-gather, the data operands of the others; the `u32[]`/`s32[]` context scalars of `-start` tuples are
  not data. XLA:TPU splits one collective into several instructions that share a `channel_id` (start, update,
  done fusions): those count once.
- Matmul FLOPs: `dot` (2 x result elements x contracted size) and `convolution` (2 x result elements x the
  kernel's input features x the window taps that land on input points: taps on padding or on the holes of an
  input dilation multiply zeros and are not counted). XLA:TPU writes most dots as convolutions.
- Kernel calls: `custom-call`s with `custom_call_target="tpu_custom_call"` (Mosaic, i.e. Pallas TPU kernels),
  by kernel name; their FLOPs are their `pl.CostEstimate`s (`kernel_flops`, with the same loop convention).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute")
DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1,
               "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "bf16": 2,
               "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0}
MOSAIC_TARGET = "tpu_custom_call"

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# An array with its layout: `bf16[8,128]{1,0:T(8,128)(2,1)S(1)}`; `S(n)`, n > 0, puts it in on-chip memory.
_ARRAY_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_CALLEE_KEYS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result shape text, e.g. 'bf16[8,128]{1,0}' or a tuple '(f32[2], u32[])'
    opcode: str
    rest: str  # operands and attributes, as printed

    def operands(self) -> list[str]:
        """Operand names (the text up to the closing parenthesis of the operand list)."""
        depth, end = 1, 0
        for end, ch in enumerate(self.rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        return re.findall(r"%([\w.\-]+)", self.rest[:end])

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=([^,]*(?:\{{[^}}]*\}})?)", self.rest)
        return match.group(1) if match else None


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]  # in text order (callees before callers)
    entry: str

    def shape_of(self, computation: str) -> dict[str, str]:
        return {i.name: i.shape for i in self.computations[computation]}


def parse(text: str) -> Module:
    """The computations and instructions of an HLO module's text (`compiled.as_text()`)."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            computations[current].append(Instruction(*match.groups()))
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return Module(computations, entry)


def array_bytes(shape: str, *, data_only: bool = False) -> float:
    """Bytes of the arrays in a shape text; `data_only` leaves out scalars (the context words of async tuples)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        sizes = [int(d) for d in dims.split(",") if d]
        if data_only and not sizes:
            continue
        total += DTYPE_BYTES.get(dtype, 0) * math.prod(sizes)
    return total


def hbm_array_bytes(shape: str) -> float:
    """Bytes of the arrays in a shape text that live in HBM (not those placed in on-chip memory, `S(n)`)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        if layout and _ON_CHIP.search(layout):
            continue
        total += DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _trip_count(module: Module, condition: str) -> int:
    """A `while` loop's trip count from its condition: `compare(i, constant(N)), direction=LT` (jax's loops
    count from 0). 1 when the condition has another form."""
    instructions = module.computations.get(condition, [])
    constants = {i.name: int(m.group(1)) for i in instructions if i.opcode == "constant"
                 for m in [re.match(r"(-?\d+)\)", i.rest)] if m}
    for i in instructions:
        if i.opcode == "compare" and (i.attribute("direction") or "").startswith("LT"):
            bounds = [constants[o] for o in i.operands() if o in constants]
            if bounds:
                return max(bounds[-1], 1)
    return 1


def executions(module: Module, *, loops: bool = True) -> dict[str, float]:
    """How many times each computation runs per run of the entry (while bodies and conditions x trip count if
    `loops`)."""
    runs = collections.defaultdict(float)
    runs[module.entry] = 1.0
    for name in reversed(list(module.computations)):  # callers come after their callees in the text
        if not runs[name]:
            continue
        for inst in module.computations[name]:
            trips = 1
            if inst.opcode == "while" and loops:
                condition = inst.attribute("condition")
                trips = _trip_count(module, condition.lstrip("%")) if condition else 1
            for key, callee in _CALLEE_KEYS.findall(inst.rest):
                runs[callee] += runs[name] * (trips if key in ("body", "condition") else 1)
            for group in _BRANCHES.findall(inst.rest):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    runs[callee] += runs[name]
    return runs


def collective_bytes(module: Module) -> dict[str, float]:
    """Per-device bytes per step of each collective kind (the module docstring says what counts)."""
    runs = executions(module)
    seen, totals = set(), collections.defaultdict(float)
    for name, instructions in module.computations.items():
        if not runs[name]:
            continue
        shapes = None
        for inst in instructions:
            kind = inst.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or inst.opcode.endswith("-done"):
                continue
            channel = inst.attribute("channel_id")
            if channel is not None:
                if channel in seen:
                    continue
                seen.add(channel)
            if kind == "all-gather":
                data = _all_gather_result(inst)
            else:
                shapes = shapes or module.shape_of(name)
                data = sum(array_bytes(shapes.get(o, ""), data_only=True) for o in inst.operands())
            totals[kind] += data * runs[name]
    return dict(totals)


def _all_gather_result(inst: Instruction) -> float:
    """An all-gather's gathered bytes; `all-gather-start` returns `(operands..., results...)`: the second half."""
    if inst.opcode == "all-gather":
        return array_bytes(inst.shape, data_only=True)
    arrays = [a for a in _ARRAY.findall(inst.shape) if a[1]]
    return sum(DTYPE_BYTES.get(t, 0) * math.prod(int(d) for d in dims.split(","))
               for t, dims in arrays[len(arrays) // 2:])


def _valid_taps(size: int, out: int, window: int, stride: int, pad_lo: int, lhs_dilation: int,
                rhs_dilation: int) -> int:
    """Pairs (output position, window tap) of one spatial dim whose tap lands on an input point."""
    o = np.arange(out)[:, None]
    k = np.arange(window)[None, :]
    pos = o * stride + k * rhs_dilation - pad_lo
    hit = (pos >= 0) & (pos <= (size - 1) * lhs_dilation) & (pos % lhs_dilation == 0)
    return int(hit.sum())


def convolution_flops(inst: Instruction, shapes: dict[str, str]) -> float:
    """2 x (output batch x output features) x kernel input features x valid (output position, tap) pairs."""
    lhs_name, rhs_name = inst.operands()[:2]
    lhs, rhs, out = _dims(shapes[lhs_name]), _dims(shapes[rhs_name]), _dims(inst.shape)
    labels = inst.attribute("dim_labels")
    lhs_l, rest = labels.split("_")
    rhs_l, out_l = rest.split("->")
    window = _parse_window(inst.attribute("window") or "", len(lhs_l) - 2)
    pairs = 1
    for d, w in enumerate(window):
        spatial = str(d)
        pairs *= _valid_taps(lhs[lhs_l.index(spatial)], out[out_l.index(spatial)], w["size"], w["stride"],
                             w["pad_lo"], w["lhs_dilate"], w["rhs_dilate"])
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * pairs


def _parse_window(text: str, ndim: int) -> list[dict]:
    fields = dict(re.findall(r"(\w+)=([\dx_\-]+)", text))
    def values(key, default):
        raw = fields.get(key)
        return [default] * ndim if raw is None else [int(v) for v in raw.split("x")]
    pads = [tuple(map(int, p.split("_"))) for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)] * ndim
    return [dict(size=s, stride=st, pad_lo=p[0], lhs_dilate=ld, rhs_dilate=rd) for s, st, p, ld, rd in
            zip(values("size", 1), values("stride", 1), pads, values("lhs_dilate", 1), values("rhs_dilate", 1))]


def dot_flops(inst: Instruction, shapes: dict[str, str]) -> float:
    lhs = _dims(shapes[inst.operands()[0]])
    contracting = inst.attribute("lhs_contracting_dims") or "{}"
    contracted = math.prod(lhs[int(d)] for d in re.findall(r"\d+", contracting))
    return 2.0 * math.prod(_dims(inst.shape)) * contracted


def matmul_flops(module: Module, *, loops: bool = True) -> float:
    """Per-device FLOPs of every dot and convolution, each computation weighted by how often it runs."""
    runs, total = executions(module, loops=loops), 0.0
    for name, instructions in module.computations.items():
        if not runs[name]:
            continue
        shapes = module.shape_of(name)
        for inst in instructions:
            if inst.opcode == "dot":
                total += dot_flops(inst, shapes) * runs[name]
            elif inst.opcode == "convolution":
                total += convolution_flops(inst, shapes) * runs[name]
    return total


_COST_FLOPS = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')


def kernel_flops(module: Module, *, loops: bool = True) -> float:
    """Per-device FLOPs of the Mosaic kernels: each call's `pl.CostEstimate` (its backend config's
    `cost_estimate.flops`, which XLA's cost analysis also counts, once per loop body), weighted by how often its
    computation runs."""
    runs, total = executions(module, loops=loops), 0.0
    for name, instructions in module.computations.items():
        for inst in instructions:
            if runs[name] and inst.opcode == "custom-call" and f'custom_call_target="{MOSAIC_TARGET}"' in inst.rest:
                match = _COST_FLOPS.search(inst.rest)
                total += float(match.group(1)) * runs[name] if match else 0.0
    return total


def kernel_calls(module: Module) -> dict[str, int]:
    """Mosaic (Pallas TPU) kernel calls per step, by kernel name."""
    runs, calls = executions(module), collections.Counter()
    for name, instructions in module.computations.items():
        for inst in instructions:
            if inst.opcode == "custom-call" and f'custom_call_target="{MOSAIC_TARGET}"' in inst.rest:
                calls[_kernel_name(inst)] += int(runs[name])
    return dict(calls)


def _kernel_name(inst: Instruction) -> str:
    """The `pallas_call`'s name: the op-name component before `pallas_call`, else the instruction's name."""
    match = re.search(r'op_name="([^"]*)"', inst.rest)
    parts = match.group(1).split("/") if match else []
    if len(parts) >= 2 and parts[-1] == "pallas_call":
        return parts[-2]
    return re.sub(r"\.\d+$", "", inst.name)


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id"}


def memory_bytes(module: Module, *, loops: bool = True) -> float:
    """Per-device HBM traffic estimate: result and operand bytes in HBM (not on-chip `S(n)` buffers) of every
    instruction outside fused computations (a fusion reads its operands and writes its result once; a fused
    dynamic-slice reads only its slice, nested fusions included, and a fused dynamic-update-slice writes only its
    update, as a scanned layer does with stacked weights; an async `-start` reads its operands and writes as
    much, its `-done` is not counted again), each computation weighted by how often it runs. `train.aot` scales XLA's `bytes accessed`
    by the ratio of `loops=True` to `loops=False`: what a cost analysis misses in loops."""
    runs, total = executions(module, loops=loops), 0.0
    fused = {callee for instructions in module.computations.values() for inst in instructions
             if inst.opcode in ("fusion", "custom-call") for key, callee in _CALLEE_KEYS.findall(inst.rest)
             if key == "calls"}
    for name, instructions in module.computations.items():
        if not runs[name] or name in fused:
            continue
        shapes = module.shape_of(name)
        for inst in instructions:
            if inst.opcode in _NO_TRAFFIC or inst.opcode.endswith("-done"):
                continue
            callee = inst.attribute("calls")
            operands = sum(hbm_array_bytes(shapes.get(o, "")) for o in inst.operands())
            if inst.opcode == "fusion" and callee and callee.lstrip("%") in module.computations:
                total += runs[name] * _fusion_traffic(module, inst, callee.lstrip("%"), shapes)
            elif inst.opcode.endswith("-start"):  # its tuple holds operands and results: read, written at -done
                total += runs[name] * 2 * operands
            else:
                total += runs[name] * (hbm_array_bytes(inst.shape) + operands)
    return total


def _fusion_traffic(module: Module, inst: Instruction, callee: str, shapes: dict[str, str]) -> float:
    body = module.computations[callee]
    inner = {i.name: i.shape for i in body}
    total = 0.0
    for index, operand in enumerate(inst.operands()):
        sliced = _sliced_reads(module, callee, index)
        if sliced is None:
            total += hbm_array_bytes(shapes.get(operand, ""))
        else:
            total += sliced  # 0 for a buffer updated in place: the update is counted as written below
    root = body[-1] if body else None  # the text ends each computation with its ROOT
    if root is not None and root.opcode == "dynamic-update-slice":
        return total + hbm_array_bytes(inner.get(root.operands()[1], ""))
    return total + hbm_array_bytes(inst.shape)


def _sliced_reads(module: Module, computation: str, index: int, depth: int = 0) -> float | None:
    """Bytes a fused computation reads of its parameter `index` when it reads only slices of it: every use is a
    `dynamic-slice` of it (its slice is read), the buffer of a `dynamic-update-slice` (updated in place: 0), or
    the same parameter of a nested fusion that does so (XLA:TPU nests the slice of a scanned layer's stacked
    weights in an inner fusion). None when some use reads the whole array."""
    body = module.computations.get(computation)
    if body is None or depth > 8:
        return None
    params = {int(m.group(1)): i.name for i in body if i.opcode == "parameter"
              for m in [re.match(r"(\d+)\)", i.rest)] if m}
    name = params.get(index)
    uses = [(i, position) for i in body for position, o in enumerate(i.operands()) if o == name]
    if name is None or not uses:
        return None
    total = 0.0
    for use, position in uses:
        nested = (use.attribute("calls") or "").lstrip("%")
        if use.opcode == "dynamic-slice" and position == 0:
            total += hbm_array_bytes(use.shape)
        elif use.opcode == "dynamic-update-slice" and position == 0:
            continue
        elif use.opcode == "fusion" and nested in module.computations:
            reads = _sliced_reads(module, nested, position, depth + 1)
            if reads is None:
                return None
            total += reads
        else:
            return None
    return total
