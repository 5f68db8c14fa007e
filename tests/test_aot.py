"""The ahead-of-time memory benchmark runs end to end: tiny config on 8 simulated CPU devices,
and by the TPU compiler (libtpu, pinned in requirements-tpu.txt, which requirements-test.txt
includes) for a 2x2 v5e slice."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import require_package, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = re.compile(r'RESULT compiler=(\w+) topology=(\S+) per_device_gib=([0-9.]+) '
                    r'no_overlap_mfu=([0-9.]+) ceiling_mfu=([0-9.]+) step_tflops=([0-9.e-]+)')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import hlo_cost  # noqa: E402


def run_benchmark(*args, cache=True):
  # One device and (for XLA:CPU programs) this session's compilation cache.
  env = subprocess_env()
  if not cache:
    env.pop('JAX_COMPILATION_CACHE_DIR')
  run = subprocess.run([sys.executable, 'benchmarks/aot_7b.py', '--tiny', *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  m = RESULT.fullmatch(lines[-1])
  assert m, lines[-1]
  no_overlap, ceiling = float(m.group(4)), float(m.group(5))
  assert 0 < no_overlap <= ceiling <= 1, lines[-1]       # a sum of the terms, and their max
  return run.stdout, m.group(1), m.group(2), float(m.group(3)), no_overlap, float(m.group(6))


@pytest.mark.slow
def test_aot_benchmark_reports_memory_and_flops():
  out, compiler, topology, gib, mfu, tflops = run_benchmark()
  assert (compiler, topology) == ('cpu', 'cpu:8')
  # The state alone (tiny model, f32 master + Adam) is megabytes; the step cannot be free.
  assert 0.001 < gib < 16 and tflops > 0 and 0 < mfu <= 1
  assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
  assert 'fits the 16 GiB' in out
  assert 'NO-OVERLAP BOUND' in out and 'CEILING' in out


def _require_libtpu():
  require_package('libtpu', 'pip install -r requirements-tpu.txt (requirements-test.txt '
                  'includes it)')


@pytest.mark.slow
def test_tpu_compiler_compiles_the_tiny_step_with_splash_attention_for_a_v5e_slice():
  """The TPU compiler of libtpu, on this CPU host, compiles the tiny stage-2 step for 4 v5e
  chips with the splash-attention kernel (run per shard) and the chunked loss; the compiled
  program holds the Pallas kernels (forward, and the backward's dq and dkv kernels)."""
  _require_libtpu()
  out, compiler, topology, gib, mfu, tflops = run_benchmark(
      '--topology=v5e:2x2', '--set', 'model.llm.attention_impl=splash', '--set',
      'model.llm.loss_chunk=128', cache=False)
  assert compiler == 'tpu', ('no TPU compiler: install the libtpu of requirements-tpu.txt\n' +
                             out[:2000])
  assert topology == 'v5e:2x2'
  assert '4 devices (TPU v5 lite)' in out
  assert "mesh: {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
  kernels = int(re.search(r'(\d+) Pallas TPU kernel call', out).group(1))
  assert kernels >= 3, out
  assert 0.001 < gib < 16 and tflops > 0 and 0 < mfu <= 1
  assert "attention 'splash'" in out


def test_stage_1_state_has_a_frozen_llm():
  """`--stage 1` builds stage 1's state (no compile): the LLM frozen (no optimizer state for it),
  the STAB, projector and head trained, the online teacher kept; stage 2's would train the LLM."""
  run = subprocess.run([sys.executable, 'benchmarks/aot_7b.py', '--tiny', '--stage', '1',
                        '--state-only'], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  line = run.stdout.strip().splitlines()[-1]
  assert line.startswith('STATE '), line
  state = json.loads(line[len('STATE '):])
  assert state['stage'] == 1 and state['n_llm_train'] == 0 and state['online_teacher']
  assert 0 < state['n_train'] < state['n_params'] / 2
  assert 'LLM frozen' in run.stdout


# One device's program: a 5-step loop that slices a layer's weight [16, 32] out of a stack,
# all-gathers it over 4 devices to [16, 128], multiplies [8, 16] by it in a fusion and
# reduce-scatters the f32 product the way the TPU compiler writes it (an all-reduce inside an
# `all-reduce-scatter` fusion) into a result it keeps in VMEM (S(1)).
SMALL_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_slice (q0: bf16[5,16,32], q1: s32[]) -> bf16[1,16,32] {
  %q0 = bf16[5,16,32]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = bf16[1,16,32]{2,1,0} dynamic-slice(%q0, %q1, %c0, %c0), dynamic_slice_sizes={1,16,32}
}

%fused_dot (p0: bf16[8,16], p1: bf16[16,128]) -> f32[8,128] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,128]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,128]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%all-reduce-scatter.1 (r0: f32[8,128]) -> f32[2,128] {
  %r0 = f32[8,128]{1,0} parameter(0)
  %ar = f32[8,128]{1,0} all-reduce(%r0), replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %z = u32[] constant(0)
  ROOT %rs = f32[2,128]{1,0} dynamic-slice(%ar, %pid, %z), dynamic_slice_sizes={2,128}
}

%body (bp: (s32[], bf16[5,16,32], bf16[8,16])) -> (s32[], bf16[5,16,32], bf16[8,16]) {
  %bp = (s32[], bf16[5,16,32]{2,1,0}, bf16[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%bp), index=0
  %w = bf16[5,16,32]{2,1,0} get-tuple-element(%bp), index=1
  %x = bf16[8,16]{1,0} get-tuple-element(%bp), index=2
  %sl = bf16[1,16,32]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %bc = bf16[16,32]{1,0} bitcast(%sl)
  %ag = bf16[16,128]{1,0} all-gather(%bc), replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={1}
  %y = f32[8,128]{1,0} fusion(%x, %ag), kind=kOutput, calls=%fused_dot
  %g = f32[2,128]{1,0:S(1)} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[5,16,32]{2,1,0}, bf16[8,16]{1,0}) tuple(%i1, %w, %x)
}

%cond (cp: (s32[], bf16[5,16,32], bf16[8,16])) -> pred[] {
  %cp = (s32[], bf16[5,16,32]{2,1,0}, bf16[8,16]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%cp), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}

ENTRY %main (w0: bf16[5,16,32], x0: bf16[8,16]) -> bf16[8,16] {
  %w0 = bf16[5,16,32]{2,1,0} parameter(0)
  %x0 = bf16[8,16]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[5,16,32]{2,1,0}, bf16[8,16]{1,0}) tuple(%zero, %w0, %x0)
  %loop = (s32[], bf16[5,16,32]{2,1,0}, bf16[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[8,16]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_program_cost_counts_each_loop_body_by_its_trip_count():
  cost = hlo_cost.program_cost(SMALL_HLO)
  assert cost['loops'] == [('loop', 5)] and cost['n_devices'] == 4
  assert cost['flops_once'] == 2 * 8 * 16 * 128                    # as XLA's cost_analysis()
  assert cost['flops'] == 5 * 2 * 8 * 16 * 128
  # Per step, over a ring of 4: the all-gather sends 3 x its 1 KiB operand, the reduce-scatter
  # 3/4 of its 4 KiB operand (not an all-reduce's 2 x 3/4).
  assert cost['ici_bytes'] == 5 * (3 * 16 * 32 * 2 + 3 / 4 * 8 * 128 * 4)
  assert cost['collectives'] == {'all-gather': 5, 'reduce-scatter': 5}
  # HBM per step: the slice reads only the layer it takes (1 KiB of the 5 KiB stack) and the
  # index, writes 1 KiB; the all-gather 1 + 4 KiB; the dot fusion 256 B + 4 KiB in, 4 KiB out;
  # the reduce-scatter 4 KiB in and its result in VMEM, not HBM; the counter 3 x 4 B; the
  # loop's condition 2 x 4 B in, 1 B out.
  step = (1024 + 4 + 1024) + (1024 + 4096) + (256 + 4096 + 4096) + 4096 + 12 + 9
  assert cost['hbm_bytes'] == 5 * step
  # A loop the compiler starts at 2 or steps by 2 runs 3 times (its trip count is not the bound).
  late = SMALL_HLO.replace('%zero = s32[] constant(0)', '%zero = s32[] constant(2)')
  assert hlo_cost.program_cost(late)['loops'] == [('loop', 3)]
  stride = SMALL_HLO.replace('%one = s32[] constant(1)', '%one = s32[] constant(2)')
  assert hlo_cost.program_cost(stride)['flops'] == 3 * 2 * 8 * 16 * 128


def test_the_no_overlap_bound_sums_the_terms_and_the_ceiling_takes_their_max():
  v5e = hlo_cost.CHIPS['v5e']
  assert (v5e['peak_tflops'], v5e['hbm_gbs'], v5e['ici_gbps']) == (197.0, 819.0, 1600.0)
  # 1 s of matmuls at peak, 1 s of HBM traffic, 0.5 s of ICI traffic (200 GB/s a chip).
  b = hlo_cost.no_overlap_bound(197e12, 819e9, 100e9, v5e, model_flops_per_device=0.9 * 197e12)
  assert (b['t_compute'], b['t_hbm'], b['t_ici']) == pytest.approx((1.0, 1.0, 0.5))
  assert b['step_s'] == pytest.approx(2.5) and b['mfu'] == pytest.approx(0.9 / 2.5)
  assert b['ceiling_s'] == pytest.approx(1.0) and b['ceiling_mfu'] == pytest.approx(0.9)
  assert hlo_cost.ici_bytes('all-reduce', 1000.0, 4) == 1500.0
  assert hlo_cost.ici_bytes('all-gather-start', 1000.0, 1) == 0.0
