"""The same training whatever the topology: each process reads its slice of every global batch,
so 1 process and N processes see the same global batches (the pipeline alone, fast), and a
tiny stage-2 run as 1 process x 8 devices and as 2 processes x 4 devices (launch/local.sh)
logs the same losses, ends with the same parameters and writes the same summary (slow).

Checkpoints hold every process's data state (faked processes, fast). With real processes
(slow, sharing the data set and the two runs above): the 2-process run is killed (both
processes, SIGKILL) after its first checkpoint and the same command resumes it, so the runs
compared are 1 x 8 uninterrupted and 2 x 4 killed and resumed; both processes write one
restorable checkpoint; the 2-process checkpoint resumes on 1 process to the same state;
evaluation and teacher feature extraction on 2 processes do every question / video once and
mark completion."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from panda_jax import storage
from panda_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------
# The index mapping (no JAX processes)

def _stream(n, batch, seed, index, count, steps):
  """Record indices process `index` of `count` reads for `steps` global batches."""
  ds = pipeline.ProcessSlices(pipeline.global_stream(range(n), seed), batch, index, count)
  return [ds[j] for j in range(steps * batch // count)]


@pytest.mark.parametrize('n, batch', [(13, 4), (16, 8), (7, 6)])
def test_n_processes_read_the_slices_of_the_one_process_batches(n, batch):
  steps = 3 * n // batch + 2                    # several epochs, batches across their ends
  one = _stream(n, batch, 3, 0, 1, steps)
  # One process: exactly the stream it read before processes took slices (the per-process
  # shard [0::1], shuffled, repeated).
  old = grain.MapDataset.source(list(range(n)))[0::1].shuffle(seed=3).repeat()
  assert one == [old[i] for i in range(len(one))]
  # Every epoch is a permutation of all records.
  assert all(sorted(one[e * n:(e + 1) * n]) == list(range(n)) for e in range(len(one) // n))
  for count in (2, batch // 2, batch):
    if batch % count:
      continue
    local = batch // count
    parts = [_stream(n, batch, 3, i, count, steps) for i in range(count)]
    for k in range(steps):
      assembled = sum((p[k * local:(k + 1) * local] for p in parts), [])
      assert assembled == one[k * batch:(k + 1) * batch], (count, k)


def test_slices_reject_a_batch_the_processes_cannot_share():
  with pytest.raises(ValueError, match='not a multiple of the 3 processes'):
    pipeline.ProcessSlices(pipeline.global_stream(range(8), 0), 8, 0, 3)


class _Ids:
  """A stand-in for ProcessSample: a record is its own sample; records in `bad` are skipped."""
  stab, max_len = None, 0

  def __init__(self, bad=()):
    self.bad = set(bad)

  def __call__(self, record):
    if record in self.bad:
      return {'skip': 'bad_video', 'path': str(record)}
    return {'id': record}


@pytest.fixture
def ids_batches(monkeypatch):
  """TrainIterator batches as the lists of record ids they hold."""
  monkeypatch.setattr(pipeline, 'collate', lambda samples, stab, max_len: [s['id'] for s in
                                                                             samples])


def _iterators(n, batch, count, proc, seed=1):
  return [pipeline.TrainIterator(list(range(n)), proc, batch, seed=seed, process_index=i,
                                 process_count=count) for i in range(count)]


def test_train_iterators_of_n_processes_assemble_the_one_process_batches(ids_batches):
  n, batch, steps = 21, 8, 9
  (one,) = _iterators(n, batch, 1, _Ids())
  want = [next(one) for _ in range(steps)]
  for count in (2, 4):
    its = _iterators(n, batch, count, _Ids())
    assert {it.steps_per_epoch for it in its} == {one.steps_per_epoch} == {n // batch}
    got = [sum((next(it) for it in its), []) for _ in range(steps)]
    assert got == want, count


def test_a_process_resumes_its_slices_mid_epoch(ids_batches):
  n, batch, count = 21, 8, 2
  proc = _Ids(bad={3, 11})
  a = _iterators(n, batch, count, proc)[1]
  for _ in range(2):
    next(a)
  state = json.loads(json.dumps(a.get_state()))       # as a checkpoint stores it
  after = [next(a) for _ in range(6)]
  b = _iterators(n, batch, count, proc)[1]
  b.set_state(state)
  assert [next(b) for _ in range(6)] == after and b.skipped == a.skipped


# ------------------------------------------------------------------------------------------
# Every process's data state in a checkpoint (processes faked)

def _saved(its):
  """The data item a checkpoint of these processes' iterators holds (the gather faked), as
  Orbax's JSON stores it."""
  from panda_jax.train import checkpoint as ckpt
  data = ckpt.gather_data_states({}, gather=lambda _: [it.get_state() for it in its])
  return json.loads(json.dumps(data))


def _resume(saved, its):
  """Each iterator takes its state from `saved` as the training loop does."""
  from panda_jax.train import checkpoint as ckpt
  for it in its:
    it.set_state(ckpt.process_data_state(saved, it.process_index, it.process_count,
                                         it.state_from))


def _run(its, steps):
  return [[next(it) for _ in range(steps)] for it in its]


def test_each_process_resumes_from_its_own_saved_state(ids_batches):
  n, batch, count = 21, 8, 2
  proc = _Ids(bad={3, 11, 12})
  its = _iterators(n, batch, count, proc)
  _run(its, 3)
  saved = _saved(its)
  assert saved['process_count'] == 2
  a, b = saved['processes']
  assert a['grain'] != b['grain'] and a['skipped'] != b['skipped']   # the skips differ
  after = _run(its, 4)
  new = _iterators(n, batch, count, proc)
  _resume(saved, new)
  assert _run(new, 4) == after
  assert [it.skipped for it in new] == [it.skipped for it in its]
  # Process 0's state on every process (what checkpoints held before): process 1 resumes at the
  # wrong place, with the wrong skip counts.
  wrong = _iterators(n, batch, count, proc)[1]
  wrong.set_state(a)
  assert _run([wrong], 4)[0] != after[1] and wrong.skipped != its[1].skipped


@pytest.mark.parametrize('before, after', [(2, 1), (1, 2), (2, 4)])
def test_a_checkpoint_without_skips_resumes_on_another_process_count(ids_batches, before,
                                                                     after):
  n, batch = 21, 8
  (one,) = _iterators(n, batch, 1, _Ids())
  want = [next(one) for _ in range(7)]
  its = _iterators(n, batch, before, _Ids())
  _run(its, 3)
  new = _iterators(n, batch, after, _Ids())
  _resume(_saved(its), new)
  assert [sum((next(it) for it in new), []) for _ in range(4)] == want[3:]


def test_skips_at_the_same_place_on_every_process_resume_on_another_count(ids_batches):
  # 4 processes of 1 sample each; each skips its first: all 4 are at global batch 4 after 3
  # steps, and 2 processes continue from there with the skips summed on process 0.
  n, batch = 21, 4
  order = _stream(n, batch, 1, 0, 1, 1)
  proc = _Ids(bad=set(order[:4]))
  its = _iterators(n, batch, 4, proc)
  _run(its, 3)
  saved = _saved(its)
  want = sum((next(it) for it in its), [])
  new = _iterators(n, batch, 2, proc)
  _resume(saved, new)
  assert sum((next(it) for it in new), []) == want
  assert new[0].skipped == collections.Counter(bad_video=4) and not new[1].skipped


def test_a_checkpoint_with_skips_at_different_places_refuses_another_count(ids_batches):
  from panda_jax.train import checkpoint as ckpt
  its = _iterators(21, 8, 2, _Ids(bad={3, 11, 12}))
  _run(its, 3)
  saved = _saved(its)
  with pytest.raises(ckpt.DataStateError, match=(
      r'saved by 2 processes and this run has 1: they stopped at different places in the data '
      r'\(positions \[\d+, \d+\].*resume on 2 processes')):
    _resume(saved, _iterators(21, 8, 1, _Ids(bad={3, 11, 12})))
  # An iterator without a map from other counts: a plain error naming both.
  with pytest.raises(ckpt.DataStateError, match='saved by 2 processes and this run has 1: '
                     'this iterator cannot map'):
    ckpt.process_data_state(saved, 0, 1)
  assert ckpt.process_data_state(saved, 1, 2) == saved['processes'][1]


def _tiny_state():
  import jax
  import jax.numpy as jnp
  from panda_jax.train.step import TrainState
  state = TrainState(step=jnp.full((), 3, jnp.int32), params={'w': jnp.arange(3.0)},
                     batch_stats={'m': jnp.ones(2)}, opt_state={'mu': jnp.zeros(3)},
                     rng=jax.random.PRNGKey(0), refused=jnp.zeros((), jnp.int32))
  return state, jax.tree.map(lambda x: x.sharding, state)


def test_checkpoints_hold_every_process_data_state_and_old_ones_restore(tmp_path):
  import orbax.checkpoint as ocp
  from panda_jax.train import checkpoint as ckpt
  state, shardings = _tiny_state()
  states = [{'grain': {'next_index': 12}, 'skipped': {'bad_video': i}} for i in range(2)]
  mngr = ckpt.manager(str(tmp_path / 'new'), 1, 2)
  ckpt.save(mngr, 3, state, states[0], gather=lambda local: [local, states[1]])
  mngr.wait_until_finished()
  _, saved = ckpt.restore(mngr, 3, state, shardings)
  assert saved == {'process_count': 2, 'processes': states}
  assert [ckpt.process_data_state(saved, i, 2) for i in (0, 1)] == states
  # One process: a list of one.
  ckpt.save(mngr, 4, state, states[1])
  mngr.wait_until_finished()
  assert ckpt.restore(mngr, 4, state, shardings)[1] == {'process_count': 1,
                                                        'processes': [states[1]]}
  # A checkpoint written before (one state at the top level) gives it to every process.
  old = ckpt.manager(str(tmp_path / 'old'), 1, 2)
  old.save(3, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      batch_stats=ocp.args.StandardSave(state.batch_stats),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.StandardSave({'step': state.step, 'rng': state.rng,
                                  'refused': state.refused}),
      data=ocp.args.JsonSave(states[1])))
  old.wait_until_finished()
  restored, saved = ckpt.restore(old, 3, state, shardings)
  assert int(restored.step) == 3 and saved == states[1]
  assert [ckpt.process_data_state(saved, i, 2) for i in (0, 1)] == [states[1]] * 2


def test_skipped_samples_are_replaced_from_the_process_own_slices(ids_batches):
  # Documented: with skips, each process fills its share from its own sub-stream, so the
  # global batches then differ from one process's (which fills from the next positions).
  n, batch = 16, 4
  order = _stream(n, batch, 1, 0, 1, 2)
  bad = order[0]                                      # the first sample of the first batch
  (one,) = _iterators(n, batch, 1, _Ids(bad={bad}))
  its = _iterators(n, batch, 2, _Ids(bad={bad}))
  assert next(one) == order[1:5]
  first = [next(it) for it in its]
  assert first[0] == [order[1], order[4]]             # its slice of global batch 1 fills in
  assert first[1] == order[2:4]
  assert its[0].skipped == collections.Counter(bad_video=1) and not its[1].skipped


# ------------------------------------------------------------------------------------------
# 1 process x 8 devices and 2 processes x 4 devices (slow)

STEPS, BATCH, SAVE_EVERY = 4, 8, 2


def _data(root):
  """12 small clips (64 x 48, 1 s), their caption annotations and a tokenizer: made once,
  read by both runs."""
  from panda_jax.data import synthetic, text
  ds = synthetic.make_dataset(root, 12, seed=0, width=64, height=48, fps=8, duration_s=1.0,
                              eval_fraction=0)
  corpus = [m['value'].replace('<video>', '') for e in json.load(open(ds.train_captions))
            for m in e['conversations']]
  text.build_tokenizer(os.path.join(root, 'tokenizer'),
                       (corpus + [text.SYSTEM_PROMPT, 'USER: ASSISTANT:']) * 2)
  return ds.train_captions


def _overrides(root, annotations):
  # 12 records in batches of 8: the 4 steps run through several epochs, and batches straddle
  # their ends. A sample is ~250 tokens (4 frames of visual tokens). Checkpoints at steps 2 and
  # 4 (the restarts start from 2).
  return {'train.batch_size': BATCH, 'train.steps': STEPS, 'train.log_every': 1,
          'train.save_every': SAVE_EVERY, 'data.synthetic_videos': 0, 'data.max_len': 320,
          'data.annotations': annotations, 'data.video_root': root,
          'data.tokenizer': os.path.join(root, 'tokenizer')}


def _arrays(workdir, step) -> dict:
  """Every saved array of checkpoint `step`, flat, as host arrays (whatever topology saved
  it: a restore onto this process's devices would refuse a checkpoint of another)."""
  import jax
  import orbax.checkpoint as ocp
  out = {}
  for item in ('params', 'batch_stats', 'opt_state', 'meta'):
    path = storage.path(workdir) / 'checkpoints' / str(step) / item
    ck = ocp.PyTreeCheckpointer()
    meta = ck.metadata(path)
    meta = getattr(meta, 'item_metadata', meta)
    meta = getattr(meta, 'tree', meta)
    tree = ck.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
    for keys, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[item + jax.tree_util.keystr(keys)] = np.asarray(v)
  return out


def _metrics(workdir):
  return [json.loads(line) for line in
          storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines()]


def _json(workdir, name):
  return storage.read_json(storage.join(workdir, name))


def _local(num, per, *args, python=sys.executable, module=None, **popen):
  """launch/local.sh NUM PER ARGS in the background (output to pipes unless `popen` says)."""
  from conftest import subprocess_env
  extra = {'LOCAL_MODULE': module} if module else {}
  popen.setdefault('stdout', subprocess.PIPE)
  popen.setdefault('stderr', subprocess.PIPE)
  return subprocess.Popen(['bash', os.path.join(ROOT, 'launch', 'local.sh'), str(num), str(per),
                           *args], cwd=ROOT, text=True,
                          env=subprocess_env(PYTHON=python, LOCAL_KILL_GRACE='5', **extra),
                          **popen)


def _train_args(workdir, overrides):
  return ['--config=configs/stage2.py:tiny', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in overrides.items())]


def _train_here(workdir, overrides):
  """The run as 1 process x 8 devices, in this process (conftest's 8 fake devices)."""
  import jax
  from configs import stage2
  from panda_jax import config as config_lib
  from panda_jax.train import loop
  from panda_jax.train.data import build_train_iterator
  config = stage2.get_config('tiny')
  for k, v in overrides.items():
    section, field = k.split('.')
    config[section][field] = v
  config_lib.save_resolved(config, str(workdir))
  run = config_lib.resolve(config)
  assert jax.process_count() == 1 and jax.device_count() == 8
  iterator = build_train_iterator(config, str(workdir), run)
  try:
    return loop.train(config, str(workdir), iterator, run=run)
  finally:
    iterator.close()


# A `python` for launch/local.sh whose processes stop for good once checkpoint HOLD is written
# (so the test kills them after a checkpoint and before the end, whatever the machine's speed).
_HOLD_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -m ]; then shift 2; exec {python} {hook} "$@"; fi
exec {python} "$@"
"""
_HOLD_HOOK = """import os, runpy, sys, time
sys.path.insert(0, {root!r})
from panda_jax.train import checkpoint
save = checkpoint.save

def hold(mngr, step, *args, **kwargs):
  save(mngr, step, *args, **kwargs)
  if step == {step}:
    mngr.wait_until_finished()
    import jax
    open(os.path.join({marks!r}, f'held.{{jax.process_index()}}'), 'w').close()
    time.sleep(900)

checkpoint.save = hold
sys.argv = ['panda_jax.main'] + sys.argv[1:]
runpy.run_module('panda_jax.main', run_name='__main__', alter_sys=True)
"""


def _hold_python(tmp, marks):
  """A `python` for launch/local.sh whose `-m` processes stop for good after checkpoint
  SAVE_EVERY, each writing `marks/held.I` when its save is complete."""
  hook, python = tmp / 'hold.py', tmp / 'python'
  hook.write_text(_HOLD_HOOK.format(root=ROOT, step=SAVE_EVERY, marks=str(marks)))
  python.write_text(_HOLD_PYTHON.format(python=sys.executable, hook=hook))
  python.chmod(0o755)
  return python


def _kill_after_checkpoint(proc, marks, log_path) -> dict:
  """Waits until both processes of `proc` hold after checkpoint SAVE_EVERY, kills them
  (SIGKILL, by the pids launch/local.sh printed) and returns what the kill left."""
  deadline = time.time() + 600
  while len(os.listdir(marks)) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  text = open(log_path).read()
  held = sorted(os.listdir(marks))
  if held == ['held.0', 'held.1']:
    for i in (0, 1):
      os.kill(int(text.split(f'process {i} of 2: pid ')[1].split(',')[0]), signal.SIGKILL)
    proc.wait(timeout=60)
  return {'held': held, 'log': text}


@pytest.fixture(scope='module')
def runs(tmp_path_factory, gcs_bucket):
  """The data set and the two runs every slow test here compares: 1 process x 8 devices
  uninterrupted (`one`, a local workdir), and 2 processes x 4 devices through launch/local.sh
  (`two`, a workdir in a Cloud Storage bucket: gs://, the emulator of conftest), killed
  (both processes, SIGKILL) once checkpoint SAVE_EVERY is written and then resumed by the same
  command (`killed`: what the kill left; `proc`, `out`, `err`: the resumed run's)."""
  tmp = tmp_path_factory.mktemp('topology')
  root = str(tmp / 'data')
  overrides = _overrides(root, _data(root))
  one, two, marks = tmp / 'one', f'{gcs_bucket}/two', tmp / 'marks'
  marks.mkdir()
  args = _train_args(two, overrides)
  log_path = tmp / 'killed.log'
  # 2 processes x 4 devices through launch/local.sh, in the background ...
  with open(log_path, 'w') as log:
    proc = _local(2, 4, *args, python=str(_hold_python(tmp, marks)), stdout=log,
                  stderr=subprocess.STDOUT)
    try:
      # ... while this process runs the same config as 1 process x 8; then the kill.
      _train_here(one, overrides)
      killed = _kill_after_checkpoint(proc, marks, log_path)
    finally:
      if proc.poll() is None:
        proc.kill()
  killed.update(returncode=proc.returncode, summary=storage.exists(f'{two}/summary.json'),
                checkpoints=storage.listdir(f'{two}/checkpoints')
                if storage.exists(f'{two}/checkpoints') else [],
                metrics=[m['step'] for m in _metrics(two)]
                if storage.exists(f'{two}/metrics.jsonl') else [])
  # The same command again: it resumes from the checkpoint. communicate() drains both pipes
  # while waiting (a full pipe would block the processes).
  again = _local(2, 4, *args)
  try:
    out, err = again.communicate(timeout=900)
  finally:
    if again.poll() is None:
      again.kill()
  return {'root': root, 'overrides': overrides, 'one': one, 'two': two, 'killed': killed,
          'proc': again, 'out': out, 'err': err}


@pytest.mark.slow
def test_one_and_two_processes_train_the_same(runs):
  one, two, proc, out, err = (runs[k] for k in ('one', 'two', 'proc', 'out', 'err'))
  assert proc.returncode == 0, err[-4000:]
  assert 'process 1 of 2, 4 local / 8 global devices' in err, err[-4000:]
  assert 'local.sh: all 2 processes finished' in out

  # The same configuration (the resolved config each run wrote; the command line's also names
  # the code version it ran) ...
  saved_one, saved_two = _json(one, 'config.json'), _json(two, 'config.json')
  assert saved_two.pop('code_version') and saved_one == saved_two
  # The bucket run wrote nothing on the local disk: no `gs:` directory where the processes
  # ran, nor here.
  assert not os.path.exists(os.path.join(ROOT, 'gs:')) and not os.path.exists('gs:')
  assert not os.path.exists(os.path.join(runs['root'], 'gs:'))
  assert {'checkpoints', 'config.json', 'metrics.jsonl', 'summary.json'} <= set(
      storage.listdir(two))
  assert any(n.startswith('events.out.tfevents.') for n in storage.listdir(two))
  # ... the same loss at every logged step ...
  m1, m2 = _metrics(one), _metrics(two)
  assert [m['step'] for m in m1] == [m['step'] for m in m2] == list(range(1, STEPS + 1))
  for a, b in zip(m1, m2):
    for k in ('loss', 'ce', 'distill', 'grad_norm'):
      assert b[k] == pytest.approx(a[k], rel=1e-5), (a['step'], k)
  # ... the same final state: parameters, BatchNorm statistics, optimizer state, step, rng.
  # The reductions run in another order (an all-reduce across processes through gloo), and
  # Adam's division by sqrt(nu) amplifies that in near-zero gradients: up to ~1e-6 apart,
  # where one other batch moves a parameter by about the learning rate (2e-3).
  s1, s2 = _arrays(one, STEPS), _arrays(two, STEPS)
  assert s1.keys() == s2.keys() and len(s1) > 200
  for k in s1:
    if s1[k].dtype.kind == 'f':
      np.testing.assert_allclose(s2[k], s1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    else:
      np.testing.assert_array_equal(s2[k], s1[k], err_msg=k)
  # ... and the same summary (written by process 0 of each run).
  sum1, sum2 = _json(one, 'summary.json'), _json(two, 'summary.json')
  assert sum1.keys() == sum2.keys() == {'step', 'loss', 'ce', 'distill', 'param_norm',
                                        'samples_seen', 'samples_skipped', 'skipped_total',
                                        'preempted'}
  exact = ('step', 'samples_seen', 'samples_skipped', 'skipped_total', 'preempted')
  assert {k: sum2[k] for k in exact} == {k: sum1[k] for k in exact} == {
      'step': STEPS, 'samples_seen': STEPS * BATCH, 'skipped_total': 0, 'preempted': False,
      'samples_skipped': dict.fromkeys(pipeline.SKIP_REASONS, 0)}
  for k in ('loss', 'ce', 'distill', 'param_norm'):
    assert sum2[k] == pytest.approx(sum1[k], rel=1e-5), k
  assert sum1['loss'] == pytest.approx(m1[-1]['loss'])


# ------------------------------------------------------------------------------------------
# Checkpoints of 2 processes: written once, resumed after a kill, resumed on 1 process (slow)

def _data_item(workdir, step) -> dict:
  """The data item of checkpoint `step` (every process's iterator state)."""
  import orbax.checkpoint as ocp
  from panda_jax.train import checkpoint as ckpt
  mngr = ocp.CheckpointManager(storage.path(workdir) / 'checkpoints',
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=ckpt.ITEMS)
  return mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data


def _assert_same_run(ref, other, tol):
  """`other` logged the same losses and ended in the same state and summary as `ref`, to
  `tol` (relative and absolute)."""
  m1, m2 = _metrics(ref), _metrics(other)
  assert [m['step'] for m in m1] == [m['step'] for m in m2] == list(range(1, STEPS + 1))
  for a, b in zip(m1, m2):
    for k in ('loss', 'ce', 'distill', 'grad_norm'):
      assert b[k] == pytest.approx(a[k], rel=tol, abs=tol), (a['step'], k)
  s1, s2 = _arrays(ref, STEPS), _arrays(other, STEPS)
  assert s1.keys() == s2.keys() and len(s1) > 200
  for k in s1:
    if s1[k].dtype.kind == 'f':
      np.testing.assert_allclose(s2[k], s1[k], rtol=tol, atol=tol, err_msg=k)
    else:
      np.testing.assert_array_equal(s2[k], s1[k], err_msg=k)
  sum1, sum2 = _json(ref, 'summary.json'), _json(other, 'summary.json')
  assert sum1.keys() == sum2.keys()
  for k in sum1:
    if isinstance(sum1[k], float):
      assert sum2[k] == pytest.approx(sum1[k], rel=tol, abs=tol), k
    else:
      assert sum2[k] == sum1[k], k


@pytest.mark.slow
def test_both_processes_write_one_restorable_checkpoint(runs):
  import orbax.checkpoint as ocp
  two, one = runs['two'], runs['one']
  assert runs['proc'].returncode == 0, runs['err'][-4000:]
  ckdir = storage.path(two) / 'checkpoints'
  # One directory per step, each committed (no temporary directory left by either process).
  assert storage.listdir(ckdir) == [str(SAVE_EVERY), str(STEPS)]
  for step in (SAVE_EVERY, STEPS):
    assert ocp.step.is_checkpoint_finalized(ckdir / str(step))
    assert {'params', 'batch_stats', 'opt_state', 'meta', 'data'} <= set(
        storage.listdir(ckdir / str(step)))
    # Both processes' data states: each at its slice of `step` global batches (4 of 8 each).
    assert _data_item(two, step) == {'process_count': 2, 'processes': [
        {'grain': {'next_index': step * BATCH // 2}, 'skipped': {}}] * 2}
    assert _data_item(one, step) == {'process_count': 1, 'processes': [
        {'grain': {'next_index': step * BATCH}, 'skipped': {}}]}
  # Every array of the middle one restores, and equals the 1-process run's at that step.
  s1, s2 = _arrays(one, SAVE_EVERY), _arrays(two, SAVE_EVERY)
  assert s1.keys() == s2.keys()
  for k in s1:
    np.testing.assert_allclose(s2[k], s1[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_both_processes_killed_after_a_checkpoint_resume_to_the_uninterrupted_state(runs):
  killed = runs['killed']
  assert killed['held'] == ['held.0', 'held.1'], killed['log'][-4000:]
  assert killed['returncode'] == 128 + signal.SIGKILL
  # Killed after checkpoint SAVE_EVERY and before the end.
  assert killed['checkpoints'] == [str(SAVE_EVERY)]
  assert not killed['summary']
  assert killed['metrics'] == list(range(1, SAVE_EVERY + 1))
  # The same command again resumed from there on both processes and ended as the
  # uninterrupted run did (1 x 8: to float reassociation, as 1 x 8 and 2 x 4 are).
  err = runs['err']
  assert runs['proc'].returncode == 0, err[-4000:]
  for i in (0, 1):
    assert f'[{i}] ' in err and f'resumed from step {SAVE_EVERY}' in err, err[-4000:]
  assert err.count(f'resumed from step {SAVE_EVERY}') == 2
  _assert_same_run(runs['one'], runs['two'], 1e-5)


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_on_one(runs, tmp_path):
  # The 2 x 4 run's checkpoint SAVE_EVERY (as the kill left it), resumed as 1 process x 8.
  work = tmp_path / 'two_to_one'
  shutil.copytree(storage.local_copy(runs['two']), work)
  shutil.rmtree(work / 'checkpoints' / str(STEPS))
  os.remove(work / 'summary.json')
  lines = open(work / 'metrics.jsonl').readlines()[:SAVE_EVERY]
  open(work / 'metrics.jsonl', 'w').writelines(lines)
  last = _train_here(work, runs['overrides'])
  assert last['step'] == STEPS and last['first_loss'] == _metrics(work)[SAVE_EVERY]['loss']
  # The steps after it on 1 process continue the data order: the same run as the 1 x 8 one
  # (to float reassociation, as 1 x 8 and 2 x 4 are).
  _assert_same_run(runs['one'], work, 1e-5)


# ------------------------------------------------------------------------------------------
# Evaluation and teacher extraction on 2 processes (slow)

@pytest.mark.slow
def test_videoqa_and_teacher_extraction_on_two_processes_do_everything_once(runs, tmp_path,
                                                                             gcs_bucket):
  root = runs['root']
  videos = sorted({e['video'] for e in json.load(open(runs['overrides']['data.annotations']))})
  # Questions about 5 of the clips (two about the first), and one whose video is not there.
  entries = [{'video_name': v, 'question': 'what moves?', 'answer': 'a square',
              'question_id': f'q{i}'} for i, v in enumerate(videos[:5] + videos[:1])]
  entries.append({'video_name': 'not_there', 'question': 'what moves?', 'answer': 'x',
                  'question_id': 'q_missing'})
  questions = tmp_path / 'q.json'
  json.dump(entries, open(questions, 'w'))
  # Predictions and features into the bucket.
  preds, features = f'{gcs_bucket}/eval/preds.json', f'{gcs_bucket}/features'
  # Both tools at once, each as 2 processes x 1 device. The model: the 2 x 4 training run's
  # (its checkpoint in the bucket).
  qa = _local(2, 1, f'--checkpoint={runs["two"]}', f'--tokenizer={root}/tokenizer',
              f'--questions={questions}', f'--video_root={root}', f'--out={preds}',
              '--batch_size=2', '--frames=4', '--max_new_tokens=3', '--decode_workers=0',
              module='panda_jax.eval.videoqa')
  ex = _local(2, 1, '--config=configs/stage2.py:tiny',
              f'--config.data.annotations={runs["overrides"]["data.annotations"]}',
              f'--config.data.video_root={root}', f'--config.data.tokenizer={root}/tokenizer',
              f'--out={features}', '--batch_size=2', module='panda_jax.teacher.extract')
  try:
    qa_out, qa_err = qa.communicate(timeout=900)
    ex_out, ex_err = ex.communicate(timeout=900)
  finally:
    for p in (qa, ex):
      if p.poll() is None:
        p.kill()
  assert qa.returncode == 0, qa_err[-4000:]
  assert ex.returncode == 0, ex_err[-4000:]

  # VideoQA: each process answered its videos' questions; together every question once.
  n = len(entries)
  lines = lambda path: storage.read_text(path).splitlines()
  parts = [[json.loads(l)['id'] for l in lines(f'{preds}.part{i}-of-2')] for i in (0, 1)]
  assert all(parts) and not set(parts[0]) & set(parts[1])
  assert sorted(parts[0] + parts[1]) == sorted(e['question_id'] for e in entries[:-1])
  rows = [json.loads(l) for l in lines(preds)]
  assert [r['id'] for r in rows] == [e['question_id'] for e in entries[:-1]]
  assert all(isinstance(r['pred'], str) for r in rows)
  assert [f['id'] for f in storage.read_json(f'{preds}.failures.json')] == ['q_missing']
  assert storage.read_json(f'{preds}.complete.json') == {
      'questions': n, 'answered': n - 1, 'failed': 1, 'processes': 2}
  said = [l.split('questions, ')[1].split(' answered now')[0] for l in qa_out.splitlines()
          if 'answered now' in l]
  assert sorted(int(x) for x in said) == sorted(len(p) for p in parts), qa_out
  assert 'complete' in qa_out

  # Teacher features: every video once, both shares marked done, the manifest complete.
  from panda_jax.data import teacher_features as features_lib
  shares = [storage.read_json(f'{features}/done.{i}-of-2.json') for i in (0, 1)]
  assert [s['videos'] for s in shares] == [6, 6] and {s['of'] for s in shares} == {12}
  written = [int(l.split('videos, ')[1].split(' written')[0]) for l in ex_out.splitlines()
             if ' written, ' in l]
  assert sorted(written) == [6, 6], ex_out
  for v in videos:
    assert storage.isfile(features_lib.feature_path(features, v)), v
  manifest = features_lib.read_manifest(features)
  assert manifest['complete'] and manifest['failed'] == 0
  assert 'complete' in ex_out
