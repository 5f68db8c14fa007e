"""The ahead-of-time memory benchmark runs end to end: tiny config on 8 simulated CPU devices,
and by the TPU compiler (libtpu, pinned in requirements-tpu.txt, which requirements-test.txt
includes) for a 2x2 v5e slice."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = re.compile(r'RESULT compiler=(\w+) topology=(\S+) per_device_gib=([0-9.]+) '
                    r'modelled_mfu=([0-9.]+) step_tflops=([0-9.e-]+)')


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
  return run.stdout, m.group(1), m.group(2), float(m.group(3)), float(m.group(4)), \
      float(m.group(5))


@pytest.mark.slow
def test_aot_benchmark_reports_memory_and_flops():
  out, compiler, topology, gib, mfu, tflops = run_benchmark()
  assert (compiler, topology) == ('cpu', 'cpu:8')
  # The state alone (tiny model, f32 master + Adam) is megabytes; the step cannot be free.
  assert 0.001 < gib < 16 and tflops > 0 and 0 < mfu <= 1
  assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
  assert 'fits the 16 GiB' in out
  assert 'MODELLED step' in out


def _require_libtpu():
  """Imports libtpu; without it, skips outside CI (CI=true: the error stands)."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    if e.name != 'libtpu' or os.environ.get('CI'):
      raise
    pytest.skip('libtpu is not installed: pip install -r requirements-tpu.txt '
                '(requirements-test.txt includes it)')


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
