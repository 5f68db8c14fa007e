"""Several JAX processes on this machine through launch/local.sh (CPU collectives over loopback)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import process_gone, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, 'launch', 'local.sh')


def _local(*args, **kwargs):
  return subprocess.Popen(['bash', LOCAL, *args], cwd=ROOT,
                          env=subprocess_env(PYTHON=sys.executable, LOCAL_KILL_GRACE='5'),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_two_processes_of_two_devices_form_one_system():
  # The STAB on a batch of 4 sharded over the 4 devices of both processes: the forward pass and
  # its replicated outputs need the two processes' collectives.
  proc = _local('2', '2', '--config=configs/stab.py:tiny', '--config.demo.frames=4',
                '--config.demo.runs=1', '--config.demo.batch=4')
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  for i in (0, 1):
    assert f'process {i} of 2, 2 local / 4 global devices' in err, err[-3000:]
    assert f"[{i}] STAB + projector: 158,098 parameters, mesh {{'data': 4, 'fsdp': 1, " in out
    assert f'[{i}] output tokens (4, 4, 21, 128)' in out
  assert 'local.sh: all 2 processes finished' in out


def test_a_failed_process_stops_the_others():
  proc = _local('2', '1', '--config=configs/stab.py:tiny')
  pids = {}
  try:
    while len(pids) < 2:
      line = proc.stdout.readline()
      assert line, proc.stderr.read()[-3000:]
      if line.startswith('local.sh: process '):
        pids[int(line.split()[2])] = int(line.split('pid ')[1].split(',')[0])
    os.kill(pids[1], signal.SIGKILL)   # process 0 now waits for a peer that will never come
    # communicate() drains both pipes while waiting: a full stderr pipe would block local.sh's
    # own message (and the processes' prefixed logs) and hang the wait.
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
  assert f'process 1 (pid {pids[1]}) exited with status 137; stopping the others' in err
  deadline = time.time() + 10
  while not process_gone(pids[0]) and time.time() < deadline:
    time.sleep(0.2)
  assert process_gone(pids[0]), f'process 0 (pid {pids[0]}) still runs'


def test_a_process_that_fails_at_once_stops_the_others(tmp_path):
  # No JAX: a fake interpreter whose process 1 exits with status 3 at once. A process that dies
  # before the script starts waiting is reaped and reported by bash first; with `wait -n` the
  # script then said "no such job" and blocked on process 0 for ever (CI, 2026-11-30).
  fake = tmp_path / 'python'
  fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi
case " $* " in
  *--process_id=1*) exit 3 ;;
  *) exec sleep 120 ;;
esac
""")
  fake.chmod(0o755)
  proc = subprocess.Popen(['bash', LOCAL, '2', '1', '--config=configs/stab.py:tiny'], cwd=ROOT,
                          env=subprocess_env(PYTHON=str(fake), LOCAL_KILL_GRACE='5'),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 3, err
  assert 'process 1 (pid ' in err and 'exited with status 3; stopping the others' in err, err
  pid0 = int(out.split('process 0 of 2: pid ')[1].split(',')[0])
  assert process_gone(pid0), f'process 0 (pid {pid0}) still runs'


@pytest.mark.parametrize('args, message', [
    (['0', '2'], "NUM_PROCESSES='0' must be a positive integer"),
    (['2', 'x'], "DEVICES_PER_PROCESS='x' must be a positive integer"),
    (['2'], 'launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS'),
])
def test_local_sh_rejects_bad_counts(args, message):
  proc = _local(*args)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 2 and message in err, err


def test_main_rejects_partial_or_bad_distributed_flags():
  cases = {
      'partial': (['--multihost', '--num_processes=2'],
                  '--coordinator_address, --process_id missing'),
      'range': (['--multihost', '--coordinator_address=127.0.0.1:1', '--num_processes=2',
                 '--process_id=2'], '--process_id=2 must be in 0..1'),
      'address': (['--multihost', '--coordinator_address=localhost', '--num_processes=1',
                   '--process_id=0'], "--coordinator_address='localhost': expected HOST:PORT"),
      'no_multihost': (['--num_processes=2'], 'need --multihost'),
  }
  # Started together: each spends its time importing JAX.
  procs = {name: subprocess.Popen([sys.executable, '-m', 'panda_jax.main',
                                   '--config=configs/stab.py:tiny', *args], cwd=ROOT,
                                  env=subprocess_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and cases[name][1] in err, (name, err[-2000:])
