"""The training loop: checkpoints, resume after a crash equals an uninterrupted run."""

import jax
import numpy as np
import pytest

from panda_jax import config as config_lib
from panda_jax.train import loop
from panda_jax.train.optimizer import flatten
from test_train_step import tiny_batch


class Batches:
  """A deterministic in-memory batch source with a resumable position."""

  def __init__(self, cfg, crash_after=None):
    self.cfg, self.i, self.crash_after, self.served = cfg, 0, crash_after, 0

  def __next__(self):
    if self.crash_after is not None and self.served == self.crash_after:
      raise KeyboardInterrupt('simulated crash')
    b = _batch(self.cfg, self.i % 3)
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
  spec = loop.batch_spec(config)
  cfg = config_lib.panda_config(config.model)
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
  c = config_lib.train_config(2, 'tiny')
  c.train.steps = steps
  c.train.save_every = 2
  c.train.log_every = 1
  c.data.max_len = 160
  c.model.stab.dropout = 0.0
  c.mesh.data, c.mesh.tensor = 4, 2       # 8 fake devices (conftest)
  return c


@pytest.mark.slow
def test_crash_and_resume_equals_uninterrupted_run(tmp_path):
  # 4 steps, saved every 2: the crash comes after step 3, the resumed run restores step 2 (and
  # the data position) and runs steps 3 and 4 again.
  full = loop.train(_config(), str(tmp_path / 'a'), Batches(_config()))
  assert full['step'] == 4
  with pytest.raises(KeyboardInterrupt):
    loop.train(_config(), str(tmp_path / 'b'), Batches(_config(), crash_after=3))
  assert loop.ckpt.latest_step(tmp_path / 'b') == 2
  resumed = loop.train(_config(), str(tmp_path / 'b'), Batches(_config()))
  assert resumed['step'] == 4
  assert resumed['loss'] == full['loss']
  from panda_jax.train import checkpoint as ckpt
  import orbax.checkpoint as ocp
  def final(w):
    m = ocp.CheckpointManager(w / 'checkpoints', item_names=ckpt.ITEMS,
                              options=ocp.CheckpointManagerOptions(read_only=True))
    return m.restore(4, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
  a, b = flatten(final(tmp_path / 'a')), flatten(final(tmp_path / 'b'))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # TensorBoard event files and a readable config are in the workdir.
  assert list((tmp_path / 'a').glob('events.out.tfevents*'))


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


def test_initial_state_is_placed_by_its_shardings_so_the_step_compiles_once():
  # A leaf placed without the mesh (as the step counter once was) has another type than the
  # step's output: the second step then traced and compiled the whole train step again.
  from panda_jax import sharding
  from panda_jax.models.panda import VideoPanda
  c = _config()
  mesh = sharding.make_mesh(c.mesh.to_dict())
  model = VideoPanda(config_lib.panda_config(c.model))
  state, state_sh, *_ = loop.create_state(c, mesh, model, jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(state)
  specs = tree.flatten_up_to(state_sh)
  assert len(leaves) == len(specs)
  for leaf, sh in zip(leaves, specs):
    assert leaf.sharding == sh, (leaf.shape, leaf.sharding, sh)
  assert state.step.sharding.mesh == mesh
