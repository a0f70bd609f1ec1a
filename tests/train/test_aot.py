"""`train.aot`: the real train step compiled for TPU slices without a TPU (libtpu, deviceless), and the HLO counters
behind its report. One tiny one-layer LM is compiled per topology (module fixture) and checked against a hand count."""
import inspect
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # test workers and other users compile side by side

from jaxattn.train import aot_hlo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1")
BATCH, SEQ, DIM, VOCAB = 16, 32, 16, 260  # tiny_config.py:lm, the byte vocabulary

# A while loop of 4 trips around an async all-gather (split in start / done sharing channel 3, the start tuple
# carrying u32[] context words), a collective-permute-start with its context operand, an all-reduce, a dot and
# a transposed convolution (lhs dilation 2: half the window taps land on holes).
HLO = """HloModule test, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%gather_start (p0: bf16[2,8]) -> (bf16[2,8], bf16[8,8], u32[], u32[]) {
  %p0 = bf16[2,8]{1,0} parameter(0)
  %ag.1 = bf16[8,8]{1,0} all-gather(%p0), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %start = (bf16[2,8]{1,0}, bf16[8,8]{1,0}, u32[], u32[]) custom-call(%ag.1), custom_call_target="AsyncCollectiveStart"
}

%gather_done (p1: bf16[2,8]) -> bf16[8,8] {
  %p1 = bf16[2,8]{1,0} parameter(0)
  ROOT %ag.2 = bf16[8,8]{1,0} all-gather(%p1), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
}

%body (param: (s32[], f32[4,8], bf16[2,8])) -> (s32[], f32[4,8], bf16[2,8]) {
  %param = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%param), index=1
  %w = bf16[2,8]{1,0} get-tuple-element(%param), index=2
  %s = (bf16[2,8]{1,0}, bf16[8,8]{1,0}, u32[], u32[]) fusion(%w), kind=kCustom, calls=%gather_start
  %g = bf16[8,8]{1,0} fusion(%w), kind=kCustom, calls=%gather_done
  %gf = f32[8,8]{1,0} convert(%g)
  %d = f32[4,8]{1,0} dot(%x, %gf), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %r = f32[4,8]{1,0} all-reduce(%d), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) tuple(%next, %r, %w)
}

%cond (param.1: (s32[], f32[4,8], bf16[2,8])) -> pred[] {
  %param.1 = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%param.1), index=0
  %trips = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %trips), direction=LT
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %w0 = bf16[2,8]{1,0} constant({...})
  %init = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) tuple(%zero, %a, %w0)
  %loop = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) while(%init), condition=%cond, body=%body
  %res = f32[4,8]{1,0} get-tuple-element(%loop), index=1
  %ctx = u32[] constant(0)
  %cp = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%res, %ctx), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[4,8]{1,0} collective-permute-done(%cp)
  %img = f32[1,5,3]{2,1,0} parameter(1)
  %k = f32[3,3,2]{2,1,0} parameter(2)
  %conv = f32[1,9,2]{2,1,0} convolution(%img, %k), window={size=3 pad=1_1 lhs_dilate=2}, dim_labels=b0f_0io->b0f
  ROOT %o = f32[4,8]{1,0} add(%cpd, %cpd)
}
"""


def test_hlo_counter_on_hand_written_module():
    module = aot_hlo.parse(HLO)
    runs = aot_hlo.executions(module)
    assert runs["body"] == 4 and runs["gather_start"] == 4 and runs["main"] == 1
    assert aot_hlo.executions(module, loops=False)["body"] == 1
    # all-gather: the gathered bf16[8,8] once per trip (start and done share channel 3); all-reduce: f32[4,8] per
    # trip; collective-permute-start: its data operand f32[4,8] only (not the u32[] context, not the -done).
    assert aot_hlo.collective_bytes(module) == {"all-gather": 4 * 128, "all-reduce": 4 * 128,
                                                "collective-permute": 128}
    dot = 2 * 4 * 8 * 8
    # transposed conv: 5 input points dilated to positions 0, 2, .., 8, padded by 1, window 3, 9 outputs; output o
    # covers positions o-1 .. o+1: two input points at odd o, one at even o (27 taps, 13 on input points)
    taps = sum(1 for o in range(9) for k in range(3) if 0 <= o + k - 1 <= 8 and (o + k - 1) % 2 == 0)
    conv = 2 * 1 * 2 * 3 * taps  # batch x out features x in features x valid (output, tap) pairs
    assert taps == 13
    assert aot_hlo.matmul_flops(module) == 4 * dot + conv
    assert aot_hlo.matmul_flops(module, loops=False) == dot + conv
    assert aot_hlo.kernel_calls(module) == {}


SLICED = """HloModule sliced

%slice (stack: f32[4,8], i: s32[]) -> f32[1,8] {
  %stack = f32[4,8]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %row = f32[1,8]{1,0} dynamic-slice(%stack, %i, %zero), dynamic_slice_sizes={1,8}
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %stack = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %row = f32[1,8]{1,0} fusion(%stack, %i), kind=kLoop, calls=%slice
  %twice = f32[1,8]{1,0} add(%row, %row)
  ROOT %out = (s32[], f32[4,8]{1,0}) tuple(%i, %stack)
}

%cond (p.1: (s32[], f32[4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (s: f32[4,8]) -> (s32[], f32[4,8]) {
  %s = f32[4,8]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(%z, %s)
  ROOT %loop = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
}
"""


# XLA:TPU often nests the slice: the layer's fusion passes the stacked weights on to an inner fusion that slices.
NESTED = SLICED.replace("%body (p:", """%outer (stack.o: f32[4,8], i.o: s32[]) -> f32[1,8] {
  %stack.o = f32[4,8]{1,0} parameter(0)
  %i.o = s32[] parameter(1)
  %sl = f32[1,8]{1,0} fusion(%stack.o, %i.o), kind=kLoop, calls=%slice
  ROOT %neg = f32[1,8]{1,0} negate(%sl)
}

%body (p:""").replace("fusion(%stack, %i), kind=kLoop, calls=%slice", "fusion(%stack, %i), kind=kOutput, calls=%outer")


@pytest.mark.parametrize("text", [SLICED, NESTED], ids=["slice", "nested_slice"])
def test_memory_traffic_reads_only_the_slice_of_stacked_weights(text):
    module = aot_hlo.parse(text)
    # per trip: the slice fusion reads one row (32 B) and the index (4 B), writes a row (32 B); the add reads two
    # rows and writes one (96 B); the condition's compare reads 4 + 4 B and writes a 1-byte pred
    per_trip = 32 + 4 + 32 + 96 + 9
    assert aot_hlo.memory_bytes(module) - aot_hlo.memory_bytes(module, loops=False) == 3 * per_trip


def test_mosaic_kernel_calls_are_named():
    text = HLO.replace('%cpd = f32[4,8]{1,0} collective-permute-done(%cp)',
                       '%cpd = f32[4,8]{1,0} custom-call(%res), custom_call_target="tpu_custom_call", '
                       'metadata={op_name="jit(f)/jvp(jit(_flash_attention))/flash_attention_fwd/pallas_call"}')
    assert aot_hlo.kernel_calls(aot_hlo.parse(text)) == {"flash_attention_fwd": 1}


def test_out_of_memory_refusals_are_read_as_a_shortfall():
    from jaxattn.train import aot_report
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(210.50G) exceeds available HBM (95.74G).\nmore")
    assert aot_report.out_of_memory(RuntimeError(message)) == (
        "Ran out of memory on HBM, the total memory required for HLO temporaries (210.50G) exceeds available HBM "
        "(95.74G)")
    assert aot_report.out_of_memory(RuntimeError("INTERNAL: something else")) is None


def test_kernel_flops_count_every_loop_trip():
    """A Mosaic call's `cost_estimate` flops, once per run of its computation (XLA's cost analysis counts a loop
    body's kernels once: `train.aot` adds the other trips)."""
    kernel = ('%k = f32[4,8]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", '
              'backend_config={"custom_call_config": {"cost_estimate":{"flops":"1000","transcendentals":"0",'
              '"bytes_accessed":"64"}}}, metadata={op_name="jit(f)/flash_attention_fwd/pallas_call"}')
    module = aot_hlo.parse(HLO.replace("  %one = s32[] constant(1)\n", f"  {kernel}\n  %one = s32[] constant(1)\n"))
    assert aot_hlo.kernel_calls(module) == {"flash_attention_fwd": 4}
    assert aot_hlo.kernel_flops(module) == 4000 and aot_hlo.kernel_flops(module, loops=False) == 1000
    assert aot_hlo.kernel_flops(aot_hlo.parse(HLO)) == 0


def _tiny_lm_config():
    sys.path.insert(0, HERE)
    import tiny_config
    config = tiny_config.get_config("lm")
    config.compile_fast = False
    return config


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("libtpu")
    from jaxattn.train import aot_report, steps, train  # noqa: F401 - train binds the real builder first
    built, original = [], steps.build_steps

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]
    steps.build_steps = recording
    try:
        return {t: (*aot_report.compile_report(_tiny_lm_config(), t, eval_step=t == TOPOLOGIES[0]), built[-1])
                for t in TOPOLOGIES}
    finally:
        steps.build_steps = original


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_report_keys_memory_and_flops(compiled, topology, tmp_path):
    from jaxattn.train import aot_report
    report, details, _ = compiled[topology]
    aot_report.write_json(report, tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert list(written) == list(aot_report.KEYS)
    assert set(written["memory_per_device"]) == {"arguments", "outputs", "temporaries", "aliased"}
    assert written["num_devices"] == 4 and written["mesh"]["data"] == 4 and written["fits"] is True
    # One layer: the MLP (dim x dim) and the head (dim x vocab), 2 FLOPs per multiply-add, x3 for training.
    hand = 6 * BATCH * SEQ * (DIM * DIM + DIM * VOCAB)
    assert written["model_flops_per_step"] == hand
    assert details["matmul_flops_per_device"] * 4 == hand  # the compiled products are exactly these
    assert hand <= written["flops_per_step"] <= 1.6 * hand  # plus elementwise work (softmax over 260 logits)
    params = VOCAB * DIM + 4 * DIM + DIM * DIM + DIM + DIM * VOCAB + VOCAB
    state_bytes = 3 * 4 * params  # fp32 parameters and two AdamW moments, replicated over data
    memory = written["memory_per_device"]
    assert state_bytes <= memory["arguments"] <= 3 * state_bytes  # TPU layouts pad small dims to tiles
    assert memory["aliased"] >= state_bytes  # the donated state
    assert written["collective_bytes_per_device"] > 0  # the gradient all-reduce over data
    assert written["step_time_lower_bound_s"] > 0 and written["compile_seconds"] > 0
    assert "fits                  true" in aot_report.format_report(report, details)
    small = {**report, "hbm_per_device": 1024, "fits": False}
    assert "false: short by" in aot_report.format_report(small, details)


def test_train_main_and_aot_share_the_step_builder(compiled):
    from jaxattn.train import steps, train
    *_, built = compiled[TOPOLOGIES[0]]
    assert built.train_fn.func is steps.train_step  # what aot compiled is the training step itself
    assert train.build_steps is steps.build_steps and train.train_step is steps.train_step
    assert "build_steps(" in inspect.getsource(train.train_and_evaluate)


def test_bad_mesh_names_the_setting():
    pytest.importorskip("libtpu")
    from jaxattn.train import aot_report, validate
    config = _tiny_lm_config()
    config.mesh.data = 3
    with pytest.raises(validate.ConfigError, match=r"config\.mesh .*needs 3 devices, but there are 4"):
        aot_report.compile_report(config, "v5e:2x2")


def test_unknown_topology_is_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "train.aot", "--config=tests/train/tiny_config.py:lm",
                             "--topology=v9x:2x2"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": HERE})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--topology='v9x:2x2'" in errors[0] and "Traceback" not in result.stderr


def test_softmax_lm_compiles_for_a_pod_with_the_flash_kernels_per_shard(tmp_path):
    """`configs/softmax_lm.py` (softmax_lm_tiny, short windows) on v5e:2x2 as data 2 x fsdp 2: the train step
    compiles with the Mosaic flash kernels in it, each on its shard of the batch (8 rows / 4 devices)."""
    pytest.importorskip("libtpu")
    hlo = tmp_path / "step.hlo"
    result = subprocess.run([sys.executable, "-m", "train.aot", "--config=configs/softmax_lm.py", "--topology=v5e:2x2",
                             "--eval_step=false", "--config.seq_len=128", "--config.batch_size=8",
                             "--config.compile_fast=true", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                             f"--hlo={hlo}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Mosaic kernels compiled: flash_attention_dkv x4, flash_attention_dq x4, flash_attention_fwd x4" in (
        result.stdout), result.stdout
    forward = [line for line in hlo.read_text().splitlines()
               if "%flash_attention_fwd" in line and "custom-call(" in line]
    assert forward and all("= (f32[2,4,128," in line for line in forward), forward[:1]
