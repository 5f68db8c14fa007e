"""End to end: the three stages chained through checkpoints on synthetic videos (a run killed
with SIGKILL that resumes to exactly the uninterrupted result: test_stages_restart.py)."""

import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from panda_jax import config as config_lib
from panda_jax.train import checkpoint as ckpt
from panda_jax.data.sources import synthetic_data
from panda_jax.train.data import build_train_iterator
from panda_jax.train.loop import train
from panda_jax.tree import flatten

STEPS = 8


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """One synthetic data set (videos, annotations, tokenizer) shared by every run here."""
  work = tmp_path_factory.mktemp('synthetic')
  c = config_lib.train_config(1, 'tiny')
  c.data.synthetic_videos = 16
  synthetic_data(c, str(work))
  root = work / 'cache' / 'synthetic'
  return {'root': root, 'tokenizer': root / 'tokenizer'}


def _config(stage, data, **train):
  c = config_lib.train_config(stage, 'tiny')
  c.data.annotations = str(data['root'] / ('train_instruct.json' if stage == 3
                                           else 'train_captions.json'))
  c.data.video_root = str(data['root'])
  c.data.tokenizer = str(data['tokenizer'])
  c.train.steps = STEPS
  c.train.log_every = 1
  c.mesh.data, c.mesh.tensor = 4, 2       # the 8 fake devices of conftest
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


def _params(workdir, step):
  m = ocp.CheckpointManager(pathlib.Path(workdir) / 'checkpoints', item_names=ckpt.ITEMS,
                            options=ocp.CheckpointManagerOptions(read_only=True))
  return flatten(m.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore())).params)



@pytest.mark.slow
def test_three_stages_chain_through_checkpoints_and_learn(tmp_path, data):
  runs = {}
  for stage in (1, 2, 3):
    c = _config(stage, data, save_every=4)
    if stage > 1:
      c.init.from_run = str(runs[stage - 1])
      c.init.require = ['^visual/', '^llm/', '^distill/']
    work = tmp_path / f'stage{stage}'
    last = train(c, str(work), build_train_iterator(c, str(work)))
    assert last['step'] == STEPS
    assert last['loss'] < 0.8 * last['first_loss'], (stage, last['first_loss'], last['loss'])
    runs[stage] = work
  # Stage 1 trained the visual part and the head but left every LLM weight as initialised.
  p4, p8 = _params(runs[1], 4), _params(runs[1], 8)
  for k in p8:
    if k.startswith('llm/'):
      np.testing.assert_array_equal(p4[k], p8[k], err_msg=k)
  assert not np.array_equal(p4['visual/projector/fc1/kernel'], p8['visual/projector/fc1/kernel'])
  # Stage 2 started from stage 1's final weights.
  s2_first = _params(runs[2], 4)
  assert not np.array_equal(s2_first['llm/lm_head/kernel'], p8['llm/lm_head/kernel'])
