"""The ahead-of-time memory benchmark runs end to end (tiny config on 8 simulated devices)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_aot_benchmark_reports_memory_and_flops():
  env = subprocess_env()      # one device and this session's compilation cache
  run = subprocess.run([sys.executable, 'benchmarks/aot_7b.py', '--tiny'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  m = re.fullmatch(r'RESULT per_device_gib=([0-9.]+) step_tflops=([0-9.]+)', lines[-1])
  assert m, lines[-1]
  gib, tflops = map(float, m.groups())
  # The state alone (tiny model, f32 master + Adam) is megabytes; the step cannot be free.
  assert 0.001 < gib < 16 and tflops > 0
  assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in run.stdout
  assert 'fits the 16 GiB' in run.stdout
