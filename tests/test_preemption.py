"""Preemption agreed by every process, and a failing process ending the job (issue 34).

One data set (12 small clips) and one uninterrupted run of STEPS steps as 1 process x 8
devices in this process (`reference`) serve every test. SIGTERM stops a run after the same step
on every process, with one checkpoint there and `preempted: true` in summary.json, and the same
command resumes it to the reference's end (1 x 8 and 2 x 4 agree to float reassociation,
relative 1e-5: tests/test_topology.py). Cases: one process in this process (SIGTERM to itself
during step 3); 2 processes x 4 devices through launch/local.sh, SIGTERM to process 1 only, then
the same command again with SIGTERM to both a step apart, then once more to the end (each run
once, the next resuming the previous one's checkpoint). And a process whose data disappears
mid-run (its too-many-skips error) ends both processes at once, the error printed once.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import process_gone
from panda_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH = 12, 8
# The time every process of a run may take to end after SIGTERM or a failure.
END_S = 60


def _overrides(root, annotations):
  # Checkpoints only where a run stops (save_every beyond the end); every step logged (the
  # tests follow the runs by their log lines). No read-ahead (data.read_threads=0): a process
  # reads its next batch's videos when it needs them (the failure test removes them mid-run).
  return {'train.batch_size': BATCH, 'train.steps': STEPS, 'train.log_every': 1,
          'train.save_every': 1000, 'data.synthetic_videos': 0, 'data.max_len': 320,
          'data.read_threads': 0, 'data.annotations': annotations, 'data.video_root': root,
          'data.tokenizer': os.path.join(root, 'tokenizer')}


def _args(workdir, overrides):
  return ['--config=configs/stage2.py:tiny', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in overrides.items())]


def _json(workdir, name):
  return storage.read_json(storage.join(str(workdir), name))


def _checkpoints(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


def _data_item(workdir, step) -> dict:
  """Every process's data state in checkpoint `step`."""
  import orbax.checkpoint as ocp
  from panda_jax.train import checkpoint as ckpt
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=ckpt.ITEMS)
  return mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  from test_topology import _data
  root = str(tmp_path_factory.mktemp('preemption') / 'data')
  return root, _overrides(root, _data(root))


def _train_here(workdir, overrides, wrap=None):
  """The run as 1 process x 8 devices in this process; `wrap` wraps its batch iterator."""
  import jax
  from configs import stage2
  from panda_jax import config as config_lib
  from panda_jax.train import loop
  from panda_jax.train.data import build_train_iterator
  config = stage2.get_config('tiny')
  config_lib.apply_overrides(config, overrides)
  run = config_lib.resolve(config)
  assert jax.process_count() == 1 and jax.device_count() == 8
  iterator = build_train_iterator(config, str(workdir), run)
  try:
    return loop.train(config, str(workdir), wrap(iterator) if wrap else iterator, run=run)
  finally:
    iterator.close()


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
  """The uninterrupted run: its summary and its loss at every step."""
  work = tmp_path_factory.mktemp('reference')
  _train_here(work, data[1])
  losses = [json.loads(l)['loss'] for l in
            storage.read_text(storage.join(str(work), 'metrics.jsonl')).splitlines()]
  return _json(work, 'summary.json'), losses


def _assert_reference_end(summary, reference):
  ref, _ = reference
  assert summary['step'] == STEPS and summary['preempted'] is False, summary
  for k in ('loss', 'param_norm'):
    assert summary[k] == pytest.approx(ref[k], rel=1e-5), k


class _SigtermAt:
  """Batches of `iterator`; sends SIGTERM to this process when batch `at` (1-based) is read,
  so the signal arrives during that step."""

  def __init__(self, iterator, at):
    self.it, self.at, self.served = iterator, at, 0

  def __next__(self):
    self.served += 1
    if self.served == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.it)

  def __getattr__(self, name):
    return getattr(self.it, name)


@pytest.mark.slow
def test_sigterm_stops_one_process_with_a_checkpoint_and_the_rerun_ends_as_uninterrupted(
    data, reference, tmp_path):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('SIGTERM handlers can only be installed in the main thread')
  work = tmp_path / 'one'
  last = _train_here(work, data[1], wrap=lambda it: _SigtermAt(it, 3))
  summary = _json(work, 'summary.json')
  assert last['step'] == summary['step'] == 3 and summary['preempted'] is True, summary
  assert _checkpoints(work) == [3]
  assert summary['loss'] == pytest.approx(reference[1][2], rel=1e-5)
  # A next stage refuses to start from it (the checked summary comes before any restore).
  from panda_jax.train import checkpoint as ckpt
  with pytest.raises(ValueError, match=f'init.from_run={work}: that run was preempted at step 3'):
    ckpt.load_params(str(work), None, None)
  # The same call again resumes and ends where the uninterrupted run did.
  _train_here(work, data[1])
  _assert_reference_end(_json(work, 'summary.json'), reference)


class _Launch:
  """launch/local.sh 2 4 ARGS in the background, its output (stdout and stderr) collected line
  by line as it comes."""

  def __init__(self, args, python=sys.executable):
    from conftest import subprocess_env
    self.proc = subprocess.Popen(
        ['bash', os.path.join(ROOT, 'launch', 'local.sh'), '2', '4', *args], cwd=ROOT,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=subprocess_env(PYTHON=python, LOCAL_KILL_GRACE='5'))
    self.lines, self.cond = [], threading.Condition()
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()
    self.pids = {i: int(self.wait_for(rf'local.sh: process {i} of 2: pid (\d+)').group(1))
                 for i in (0, 1)}

  def _read(self):
    for line in self.proc.stdout:
      with self.cond:
        self.lines.append(line)
        self.cond.notify_all()
    with self.cond:
      self.lines.append(None)            # the end of the output
      self.cond.notify_all()

  @property
  def out(self) -> str:
    with self.cond:
      return ''.join(l for l in self.lines if l is not None)

  def wait_for(self, pattern, timeout=600):
    """The first match of `pattern` in an output line (None: the output ended, or `timeout`)."""
    regex, seen, deadline = re.compile(pattern), 0, time.time() + timeout
    with self.cond:
      while True:
        for line in self.lines[seen:]:
          if line is None:
            return None
          m = regex.search(line)
          if m:
            return m
        seen = len(self.lines)
        left = deadline - time.time()
        if left <= 0:
          return None
        self.cond.wait(left)

  def step_logged(self, process, step, timeout=600):
    return self.wait_for(rf'^\[{process}\] .*step {step}/{STEPS} loss', timeout)

  def signal(self, process):
    try:
      os.kill(self.pids[process], signal.SIGTERM)
    except ProcessLookupError:
      pass                               # already gone

  def end(self, timeout=END_S) -> float:
    """Waits until local.sh and both processes are gone; returns the seconds it took (the
    processes are killed after `timeout`, and the time is then over it)."""
    t0 = time.time()
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pass
    gone = lambda: all(process_gone(p) for p in self.pids.values())
    while not gone() and time.time() - t0 < timeout:
      time.sleep(0.2)
    took = time.time() - t0 if self.proc.poll() is not None and gone() else float('inf')
    if self.proc.poll() is None:
      for p in self.pids.values():
        try:
          os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
          pass
      self.proc.kill()
      self.proc.wait(timeout=30)
    self.reader.join(timeout=30)
    return took


def _stopped(launch, workdir, signalled_at) -> dict:
  """What a run stopped by SIGTERM left: its status, time to end, output, summary and
  checkpoints."""
  took = launch.end()
  summary = _json(workdir, 'summary.json') if os.path.exists(
      os.path.join(workdir, 'summary.json')) else None
  return {'returncode': launch.proc.returncode, 'took': took, 'out': launch.out,
          'signalled_at': signalled_at, 'summary': summary,
          'checkpoints': _checkpoints(workdir),
          'data': {s: _data_item(workdir, s) for s in _checkpoints(workdir)}}


@pytest.fixture(scope='module')
def chain(data, tmp_path_factory):
  """One workdir, the same command three times on 2 processes x 4 devices: SIGTERM to process 1
  once it logged step 2 (`one`); SIGTERM to process 0 at the first step after the resume and to
  process 1 a step later (`both`); then to the end (`end`)."""
  work = str(tmp_path_factory.mktemp('chain') / 'work')
  args = _args(work, data[1])
  runs = {}
  launch = _Launch(args)
  launch.step_logged(1, 2)
  launch.signal(1)
  runs['one'] = _stopped(launch, work, 2)
  first = runs['one']['summary']['step'] if runs['one']['summary'] else 0
  launch = _Launch(args)
  launch.step_logged(0, first + 1)
  launch.signal(0)
  # A step later on process 1; on the old per-process flag process 0 saved while process 1
  # went on, and neither reached another step: then the signal goes after 30 s.
  launch.step_logged(1, first + 2, timeout=30)
  launch.signal(1)
  runs['both'] = _stopped(launch, work, first + 1)
  launch = _Launch(args)
  took = launch.end(timeout=600)
  runs['end'] = {'returncode': launch.proc.returncode, 'took': took, 'out': launch.out,
                 'summary': _json(work, 'summary.json'), 'checkpoints': _checkpoints(work)}
  return runs


def _assert_stopped_together(run, reference, after):
  """Both processes ended within END_S, status 0, at one step after `after` and before the end,
  with one checkpoint there holding both processes' data states at that step."""
  out = run['out']
  assert run['returncode'] == 0 and run['took'] <= END_S, (run['took'], out[-4000:])
  assert 'local.sh: all 2 processes finished' in out
  summary = run['summary']
  assert summary and summary['preempted'] is True, (summary, out[-4000:])
  step = summary['step']
  assert after < step < STEPS, step
  for i in (0, 1):
    assert out.count(f'[{i}] ') and re.search(
        rf'^\[{i}\] .*preempted: every process stops after step {step} of {STEPS}', out,
        re.M), out[-4000:]
    # No process took a step past it.
    assert not re.search(rf'^\[{i}\] .*step {step + 1}/{STEPS} loss', out, re.M)
  assert run['checkpoints'][-1] == step
  assert run['data'][step] == {'process_count': 2, 'processes': [
      {'grain': {'next_index': step * BATCH // 2}, 'skipped': {}}] * 2}
  assert summary['samples_seen'] == step * BATCH
  # The checkpoint is that step's (the loss the uninterrupted run had there).
  assert summary['loss'] == pytest.approx(reference[1][step - 1], rel=1e-5)
  return step


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(chain, reference):
  step = _assert_stopped_together(chain['one'], reference, 2)
  assert chain['one']['checkpoints'] == [step]


@pytest.mark.slow
def test_sigterm_to_both_a_step_apart_stops_both_at_one_step(chain, reference):
  first = chain['one']['summary']['step']
  out = chain['both']['out']
  assert out.count(f'resumed from step {first}') == 2, out[-4000:]
  step = _assert_stopped_together(chain['both'], reference, first + 1)
  assert chain['both']['checkpoints'] == [first, step]


@pytest.mark.slow
def test_the_same_command_resumes_to_the_uninterrupted_end(chain, reference):
  end = chain['end']
  assert end['returncode'] == 0, end['out'][-4000:]
  second = chain['both']['summary']['step']
  assert end['out'].count(f'resumed from step {second}') == 2
  assert end['checkpoints'][-1] == STEPS
  _assert_reference_end(end['summary'], reference)


# A `python` for launch/local.sh that gives process 1 its own copy of the videos (its own disk).
_OWN_DISK_PYTHON = """#!/usr/bin/env bash
case " $* " in
  *" --process_id=1 "*) exec {python} "$@" --config.data.video_root={root} ;;
esac
exec {python} "$@"
"""


@pytest.mark.slow
def test_a_failing_process_ends_the_job_with_its_error_printed_once(data, tmp_path):
  root, overrides = data
  own = tmp_path / 'own'
  shutil.copytree(os.path.join(root, 'videos'), own / 'videos')
  python = tmp_path / 'python'
  python.write_text(_OWN_DISK_PYTHON.format(python=sys.executable, root=own))
  python.chmod(0o755)
  launch = _Launch(_args(tmp_path / 'work', overrides), python=str(python))
  assert launch.step_logged(1, 2), launch.out[-4000:]
  # Process 1's disk goes: its next batch finds no video, and after 1,000 skipped samples in
  # a row its iterator raises (at step 3, or 4 when it read step 3's videos first).
  shutil.rmtree(own / 'videos')
  took = launch.end()
  out = launch.out
  assert launch.proc.returncode == 1 and took <= END_S, (took, out[-4000:])
  error = re.findall(r'^\[1\] RuntimeError: 1001 samples in a row were skipped .*$', out, re.M)
  assert len(error) == 1, out[-4000:]
  assert out.count('1001 samples in a row were skipped') == 1   # not repeated by process 0
  assert re.search(r'^\[1\] .*process 1 of 2 failed \(the error above\); stopping', out, re.M)
  assert re.search(r'^\[0\] .*process 1 of 2 failed with RuntimeError \(its error is in its '
                   r'output\); stopping process 0 too', out, re.M), out[-4000:]
  assert f'local.sh: process 1 (pid {launch.pids[1]}) exited with status 1; stopping the ' \
         'others' in out
  assert not re.search(rf'^\[1\] .*step 5/{STEPS} loss', out, re.M)
