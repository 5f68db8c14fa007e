"""The training loop: checkpoints; resume after a crash, or after a kill during an asynchronous
save, equals an uninterrupted run (dropout on); non-finite steps refused, counted and capped."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from panda_jax import config as config_lib
from panda_jax.train import loop
from panda_jax.tree import flatten
from test_train_step import tiny_batch


class Batches:
  """A deterministic in-memory batch source with a resumable position."""

  def __init__(self, cfg, crash_after=None, nan_at=()):
    self.cfg, self.i, self.crash_after, self.served = cfg, 0, crash_after, 0
    self.nan_at = set(nan_at)          # positions (0-based) whose pixels are all NaN

  def __next__(self):
    if self.crash_after is not None and self.served == self.crash_after:
      raise KeyboardInterrupt('simulated crash')
    b = _batch(self.cfg, self.i % 3)
    if self.i in self.nan_at:
      b['pixels'] = np.full_like(b['pixels'], np.nan)
    self.i += 1
    self.served += 1
    return b

  def get_state(self):
    return {'index': self.i}

  def set_state(self, state):
    self.i = state['index']


def _batch(config, seed):
  """A host batch with the tiny model's shapes (see test_train_step.tiny_batch)."""
  from conftest import box_mask
  from panda_jax.data.assembly import layout_batch
  run = config_lib.resolve(config)
  spec, cfg = run.batch, run.model
  b, f = spec['mask'][0][:2]
  rng = np.random.default_rng(seed)
  px = rng.standard_normal(spec['pixels'][0]).astype(np.float32)
  size = cfg.stab.image_size
  mask = np.ones(spec['mask'][0], np.float32)
  mask[1, :, : size // 4] = 0
  ids = np.concatenate([np.array([[1, 7] + [-200] * f + [5]] * b),
                        rng.integers(3, 300, (b, 6))], axis=1)
  labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - 6, ids, -100)
  lay = layout_batch(ids, labels, np.ones_like(ids), mask, cfg.stab,
                     max_len=config.data.max_len)
  teacher = rng.standard_normal(spec['teacher_pixels'][0]).astype(np.float32)
  return dict(lay, pixels=px, mask=mask, teacher_pixels=teacher,
              teacher_valid=np.ones((b, f), bool))


def _config(steps=4):
  """Dropout on (the tiny default, 0.5): a resumed run must restore the random state too."""
  c = config_lib.train_config(2, 'tiny')
  c.train.steps = steps
  c.train.save_every = 2
  c.train.log_every = 1
  c.data.max_len = 160
  c.mesh.data, c.mesh.tensor = 4, 2       # 8 fake devices (conftest)
  assert c.model.stab.dropout > 0
  return c


def _checkpoint(workdir, step) -> dict:
  """Every saved array of checkpoint `step` (params, batch_stats, opt_state, meta), flat."""
  from panda_jax.train import checkpoint as ckpt
  m = ocp.CheckpointManager(workdir / 'checkpoints', item_names=ckpt.ITEMS,
                            options=ocp.CheckpointManagerOptions(read_only=True))
  items = ('params', 'batch_stats', 'opt_state', 'meta')
  r = m.restore(step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in items}))
  out = {}
  for k in items:
    for path, v in jax.tree_util.tree_flatten_with_path(r[k])[0]:
      names = [str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path]
      out['/'.join([k] + names)] = np.asarray(v)
  return out


def _assert_checkpoints_equal(a, b, step):
  ca, cb = _checkpoint(a, step), _checkpoint(b, step)
  assert sorted(ca) == sorted(cb) and 'meta/rng' in ca
  for k in ca:
    np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """4 steps, saved every 2, dropout on: the run the interrupted ones must end equal to."""
  work = tmp_path_factory.mktemp('uninterrupted')
  last = loop.train(_config(), str(work), Batches(_config()))
  assert last['step'] == 4
  return work, last


def test_summary_of_the_run(uninterrupted):
  import json
  from panda_jax.data.pipeline import SKIP_REASONS
  work, last = uninterrupted
  summary = json.load(open(work / 'summary.json'))
  assert summary['step'] == 4 and summary['samples_seen'] == 4 * _config().train.batch_size
  assert {k: summary[k] for k in ('loss', 'ce', 'distill')} == \
      {k: pytest.approx(last[k]) for k in ('loss', 'ce', 'distill')}
  # An iterator without skip counters (this one) skipped nothing.
  assert summary['samples_skipped'] == dict.fromkeys(SKIP_REASONS, 0)
  assert summary['skipped_total'] == 0
  params = [v for k, v in _checkpoint(work, 4).items() if k.startswith('params/')]
  norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in params))
  assert summary['param_norm'] == pytest.approx(norm, rel=1e-5)


def test_skip_counts_are_named_and_summed():
  class It:
    skipped = {'bad_video': 2, 'too_long': 1}
  assert loop.skipped_by_reason(It()) == {'bad_conversation': 0, 'bad_video': 2,
                                          'too_long': 1, 'missing_teacher_features': 0}
  It.skipped = {'typo': 1}
  with pytest.raises(ValueError, match='typo'):
    loop.skipped_by_reason(It())


@pytest.mark.slow
def test_crash_and_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
  # 4 steps, saved every 2: the crash comes after step 3, the resumed run restores step 2 (and
  # the data position and the dropout random state) and runs steps 3 and 4 again.
  full_dir, full = uninterrupted
  with pytest.raises(KeyboardInterrupt):
    loop.train(_config(), str(tmp_path / 'b'), Batches(_config(), crash_after=3))
  assert loop.ckpt.latest_step(tmp_path / 'b') == 2
  resumed = loop.train(_config(), str(tmp_path / 'b'), Batches(_config()))
  assert resumed['step'] == 4
  assert resumed['loss'] == full['loss']
  # Parameters, BatchNorm statistics, optimizer state, step and random state, bit for bit.
  _assert_checkpoints_equal(full_dir, tmp_path / 'b', 4)
  import json
  assert json.load(open(tmp_path / 'b' / 'summary.json')) == \
      json.load(open(full_dir / 'summary.json'))
  # TensorBoard event files and a readable config are in the workdir.
  assert list(full_dir.glob('events.out.tfevents*'))


# Run in a subprocess: hold the asynchronous save of checkpoint 4 just before Orbax commits it
# (its files written to a temporary directory, not yet renamed into place), say so, and wait
# there to be killed.
_KILLED_SCRIPT = """
import pathlib, sys, time
sys.path.insert(0, {tests!r})
from orbax.checkpoint._src.checkpointers import async_checkpointer as ac
commit = ac._on_commit_callback
def held(tmpdir, *args, **kwargs):
  if pathlib.Path(tmpdir.get_final()).name == '4':
    pathlib.Path({mark!r}).write_text(str(tmpdir.get()))
    time.sleep(600)
  return commit(tmpdir, *args, **kwargs)
ac._on_commit_callback = held
from test_loop import Batches, _config
from panda_jax.train import loop
loop.train(_config(), {work!r}, Batches(_config()))
"""


@pytest.mark.slow
def test_kill_during_async_save_resumes_from_the_newest_complete_checkpoint(
    uninterrupted, tmp_path):
  from conftest import JAX_CACHE, subprocess_env
  work, mark = tmp_path / 'killed', tmp_path / 'in_flight'
  tests = os.path.dirname(os.path.abspath(__file__))
  script = _KILLED_SCRIPT.format(tests=tests, mark=str(mark), work=str(work))
  # The same 8 fake devices and compilation cache as this process: the step compiles once.
  env = subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=8',
                       PANDA_TEST_JAX_CACHE=JAX_CACHE)
  proc = subprocess.Popen([sys.executable, '-c', script], cwd=os.path.dirname(tests), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert mark.exists(), proc.communicate(timeout=30)[0][-3000:] if proc.poll() is not None \
        else 'the save of step 4 never started'
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  # Checkpoint 4 was written but never committed; 2 is the newest complete one.
  assert os.path.isdir(mark.read_text()) and not (work / 'checkpoints' / '4').exists()
  assert loop.ckpt.latest_step(work) == 2
  resumed = loop.train(_config(), str(work), Batches(_config()))
  assert resumed['step'] == 4
  _assert_checkpoints_equal(uninterrupted[0], work, 4)


def _nan_config(max_refused):
  c = _config()
  c.train.log_every = 4                  # no host read of the step before step 2's save
  c.train.max_refused_steps = max_refused
  return c


@pytest.mark.slow
def test_non_finite_steps_are_refused_counted_and_stop_the_run(tmp_path):
  """A NaN batch at step 3: the step is refused on the device (no per-step host read), counted,
  the loop and the state agree on the step; past `max_refused_steps` the run stops with an
  error at its next logging or saving step, and no checkpoint holds a non-finite value."""
  tolerant = loop.train(_nan_config(1), str(tmp_path / 'a'), Batches(_config(), nan_at=[2]))
  assert tolerant['step'] == 4 and tolerant['refused_steps'] == 1
  assert np.isfinite(tolerant['loss'])
  for step in (2, 4):
    saved = _checkpoint(tmp_path / 'a', step)
    assert int(saved['meta/step']) == step                  # the loop's step == state.step
    assert int(saved['meta/refused']) == (1 if step == 4 else 0)
    for k, v in saved.items():
      assert np.all(np.isfinite(v)), (step, k)

  with pytest.raises(loop.NonFiniteError,
                     match=r'1 steps refused by step 4 .*max_refused_steps=0; the newest '
                           r'checkpoint \(step 2\)'):
    loop.train(_nan_config(0), str(tmp_path / 'b'), Batches(_config(), nan_at=[2]))
  assert loop.ckpt.latest_step(tmp_path / 'b') == 2
  assert all(np.all(np.isfinite(v)) for v in _checkpoint(tmp_path / 'b', 2).values())


def test_a_state_with_a_non_finite_value_is_never_saved():
  """The check run before every save (refused steps keep the state finite; this is the guard
  for anything else, such as an overflow in the optimizer)."""
  import jax.numpy as jnp
  state = {'params': {'w': jnp.ones(3)}, 'opt_state': (jnp.zeros(2), jnp.int32(3)),
           'rng': jax.random.PRNGKey(0)}
  assert bool(loop._all_finite(state))
  state['opt_state'] = (jnp.array([0.0, jnp.inf]), jnp.int32(3))
  assert not bool(loop._all_finite(state))


def test_one_epoch_is_the_smallest_process_count():
  assert loop.global_steps(7) == 7                     # one process: its own count
  seen = []

  def gather(x):                                       # three hosts with unequal shards
    seen.append(int(x))
    return np.array([int(x), 5, 9])

  assert loop.global_steps(7, gather) == 5 and seen == [7]

  class It:
    steps_per_epoch = 0
  c = _config()
  c.train.steps = -1
  with pytest.raises(ValueError, match='known size'):
    loop.resolve_steps(c, It())
  It.steps_per_epoch = 11
  assert loop.resolve_steps(c, It()) == 11


def test_a_later_run_of_the_same_step_reuses_its_traced_program(uninterrupted, tmp_path,
                                                                monkeypatch):
  """train() in one process keeps its jitted step: another run of the same config builds and
  traces no step (the uninterrupted run's program serves every run here, traced once) and ends
  as that run did; every input of the step's program is in the key it is kept under."""
  built = []
  real = loop.make_train_step
  monkeypatch.setattr(loop, 'make_train_step', lambda *a, **k: built.append(1) or real(*a, **k))
  # The step of the uninterrupted run, and of every run since (this module trains one config).
  fn = next(reversed(loop._STEP_CACHE.values()))
  loop.train(_config(), str(tmp_path / 'b'), Batches(_config()))
  assert built == [] and next(reversed(loop._STEP_CACHE.values())) is fn
  assert fn._cache_size() == 1
  np.testing.assert_array_equal(_checkpoint(tmp_path / 'b', 4)['params/llm/lm_head/kernel'],
                                _checkpoint(uninterrupted[0], 4)['params/llm/lm_head/kernel'])
  # The key: anything the program is built from changes it; the workdir and the loop's own
  # settings do not.
  from panda_jax import sharding
  c = _config()
  mesh = sharding.make_mesh(c.mesh.to_dict())
  labels = {'visual/w': 'visual', 'llm/w': 'llm'}

  def key(config, mesh=mesh, labels=labels):
    return loop._step_key(config, config_lib.resolve(config), mesh, labels, {}, {}, {})

  base = key(c)
  same = _config()
  same.train.max_refused_steps, same.train.save_every, same.train.log_every = 0, 1, 3
  assert key(same) == base
  for change in ('optim.lr', 'train.steps', 'train.accum_steps', 'model.distill_weight',
                 'model.llm.layers', 'model.stab.dropout', 'model.dtype'):
    other = _config()
    section, *path, field = change.split('.')
    node = other[section]
    for p in path:
      node = node[p]
    value = node[field]
    node[field] = {'bfloat16': 'float32', 'float32': 'bfloat16'}.get(value, (
        value / 2 if field == 'dropout' else value * 2 if value else 1))
    if change == 'train.accum_steps':
      other.train.batch_size *= 2
    assert key(other) != base, change
  assert key(c, labels={**labels, 'llm/w': 'frozen'}) != base
  assert key(c, mesh=sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})) != base


@pytest.mark.parametrize('lr_scale', [(), (('^llm/', 0.02),)])
def test_initial_state_is_placed_by_its_shardings_so_the_step_compiles_once(lr_scale):
  # A leaf placed without the mesh (as the step counter once was) has another type than the
  # step's output: the second step then traced and compiled the whole train step again. With
  # two learning-rate groups each group's optimizer state holds placeholders (MaskedNode) for
  # the other group's parameters.
  from panda_jax import sharding
  from panda_jax.models.panda import VideoPanda
  c = _config()
  c.optim.lr_scale = lr_scale
  mesh = sharding.make_mesh(c.mesh.to_dict())
  run = config_lib.resolve(c)
  model = VideoPanda(run.model)
  state, state_sh, *_ = loop.create_state(c, run, mesh, model, jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(state)
  specs = tree.flatten_up_to(state_sh)
  assert len(leaves) == len(specs)
  for leaf, sh in zip(leaves, specs):
    assert leaf.sharding == sh, (leaf.shape, leaf.sharding, sh)
  assert state.step.sharding.mesh == mesh


def test_saving_small_replicated_arrays_compiles_nothing(tmp_path):
  """Orbax would cut each replicated shard into per-replica slices on the device, one small
  compiled program per shape (13 s of a 35 s tiny run); small arrays are written whole
  (`checkpoint.MIN_REPLICA_PARALLEL_SLICE_BYTES`), so a save compiles no program at all."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from panda_jax import sharding
  from panda_jax.train import checkpoint as ckpt
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 1, 'tensor': 2})
  # Replicated over `data` (4 replicas of each shard), and fully replicated (8); a first axis
  # the replicas can split, and shapes no other test here uses (nothing cached in memory).
  state = {'w': jax.device_put(np.arange(12 * 10, dtype=np.float32).reshape(12, 10),
                               NamedSharding(mesh, P(None, 'tensor'))),
           'b': jax.device_put(np.ones((24, 3), np.float32), NamedSharding(mesh, P()))}
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
  mngr = ckpt.manager(tmp_path, save_every=1, keep=1)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mngr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert '/jax/core/compile/backend_compile_duration' not in compiles, compiles
  restored = mngr.restore(1, args=ocp.args.Composite(params=ocp.args.StandardRestore(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                   state)))).params
  for k in state:
    np.testing.assert_array_equal(restored[k], state[k])


def test_the_loop_runs_at_most_two_steps_ahead_of_the_devices():
  """JAX returns before a step has run; `_Inflight` (what the loop adds each step's loss to)
  keeps at most MAX_STEPS_AHEAD of them unfinished, so a SIGTERM's checkpoint waits for at
  most that many steps. Without it, six slow computations dispatched in a row are all pending."""
  import jax.numpy as jnp

  @jax.jit
  def slow(x):
    for _ in range(40):
      x = jnp.tanh(x @ x)
    return jnp.sum(x)

  x = jnp.ones((384, 384)) / 384
  slow(x).block_until_ready()                    # compiled
  free = [slow(x + i) for i in range(6)]
  assert sum(not r.is_ready() for r in free) > loop.MAX_STEPS_AHEAD
  jax.block_until_ready(free)
  inflight, results = loop._Inflight(), []
  for i in range(6):
    results.append(slow(x + i))
    inflight.add(results[-1])
    assert sum(not r.is_ready() for r in results) <= loop.MAX_STEPS_AHEAD == 2
  with pytest.raises(ValueError, match='limit=0'):
    loop._Inflight(0)
