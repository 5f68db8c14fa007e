"""The same training whatever the topology: each process reads its slice of every global batch,
so 1 process and N processes see the same global batches (the pipeline alone, fast), and a
tiny stage-2 run as 1 process x 8 devices and as 2 processes x 4 devices (launch/local.sh)
logs the same losses, ends with the same parameters and writes the same summary (slow)."""

import collections
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

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

STEPS, BATCH = 6, 8


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
  # 12 records in batches of 8: the 6 steps run through several epochs, and batches straddle
  # their ends. A sample is ~250 tokens (4 frames of visual tokens).
  return {'train.batch_size': BATCH, 'train.steps': STEPS, 'train.log_every': 1,
          'train.save_every': STEPS, 'data.synthetic_videos': 0, 'data.max_len': 320,
          'data.annotations': annotations, 'data.video_root': root,
          'data.tokenizer': os.path.join(root, 'tokenizer')}


def _arrays(workdir, step) -> dict:
  """Every saved array of checkpoint `step`, flat, as host arrays (whatever topology saved
  it: a restore onto this process's devices would refuse a checkpoint of another)."""
  import jax
  import orbax.checkpoint as ocp
  out = {}
  for item in ('params', 'batch_stats', 'opt_state', 'meta'):
    path = os.path.join(workdir, 'checkpoints', str(step), item)
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
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.slow
def test_one_and_two_processes_train_the_same(tmp_path):
  from conftest import subprocess_env
  from configs import stage2
  from panda_jax import config as config_lib
  from panda_jax.train import loop
  from panda_jax.train.data import build_train_iterator

  root = str(tmp_path / 'data')
  overrides = _overrides(root, _data(root))
  one, two = tmp_path / 'one', tmp_path / 'two'
  # 2 processes x 4 devices through launch/local.sh, in the background ...
  proc = subprocess.Popen(
      ['bash', os.path.join(ROOT, 'launch', 'local.sh'), '2', '4',
       '--config=configs/stage2.py:tiny', f'--workdir={two}',
       *(f'--config.{k}={v}' for k, v in overrides.items())],
      cwd=ROOT, env=subprocess_env(PYTHON=sys.executable, LOCAL_KILL_GRACE='5'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    # ... while this process (8 devices, conftest) runs the same config as 1 process x 8.
    config = stage2.get_config('tiny')
    for k, v in overrides.items():
      section, field = k.split('.')
      config[section][field] = v
    config_lib.save_resolved(config, str(one))
    run = config_lib.resolve(config)
    import jax
    assert jax.process_count() == 1 and jax.device_count() == 8
    iterator = build_train_iterator(config, str(one), run)
    try:
      loop.train(config, str(one), iterator, run=run)
    finally:
      iterator.close()
    # communicate() drains both pipes while waiting (a full pipe would block the processes).
    out, err = proc.communicate(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-4000:]
  assert 'process 1 of 2, 4 local / 8 global devices' in err, err[-4000:]
  assert 'local.sh: all 2 processes finished' in out

  # The same configuration (the resolved config each run wrote) ...
  assert json.load(open(one / 'config.json')) == json.load(open(two / 'config.json'))
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
  sum1 = json.load(open(one / 'summary.json'))
  sum2 = json.load(open(two / 'summary.json'))
  assert sum1.keys() == sum2.keys() == {'step', 'loss', 'ce', 'distill', 'param_norm',
                                        'samples_seen', 'samples_skipped', 'skipped_total'}
  exact = ('step', 'samples_seen', 'samples_skipped', 'skipped_total')
  assert {k: sum2[k] for k in exact} == {k: sum1[k] for k in exact} == {
      'step': STEPS, 'samples_seen': STEPS * BATCH, 'skipped_total': 0,
      'samples_skipped': dict.fromkeys(pipeline.SKIP_REASONS, 0)}
  for k in ('loss', 'ce', 'distill', 'param_norm'):
    assert sum2[k] == pytest.approx(sum1[k], rel=1e-5), k
  assert sum1['loss'] == pytest.approx(m1[-1]['loss'])
