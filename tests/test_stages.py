"""End to end: the three stages chained through checkpoints on synthetic videos, and a run
killed with SIGKILL that resumes to exactly the uninterrupted result."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import subprocess_env
from panda_jax import config as config_lib
from panda_jax.train import checkpoint as ckpt
from panda_jax.data.sources import synthetic_data
from panda_jax.train.data import build_train_iterator
from panda_jax.train.loop import train
from panda_jax.tree import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _main(workdir, data, steps, *extra):
  c = ['--config=configs/stage2.py:tiny', f'--workdir={workdir}',
       f'--config.data.annotations={data["root"] / "train_captions.json"}',
       f'--config.data.video_root={data["root"]}', f'--config.data.tokenizer={data["tokenizer"]}',
       f'--config.train.steps={steps}', '--config.train.save_every=2',
       '--config.model.stab.dropout=0.0', *extra]
  return [sys.executable, '-m', 'panda_jax.main', *c]


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted(tmp_path, data):
  # Killed once checkpoint 2 of 6 exists: four steps (and two saves) of margin, as many as the
  # kill at 4 of 8 had. The reference and the victim run side by side (one waits on imports and
  # compilation while the other computes); the restart reads their compiled step from the
  # session's compilation cache.
  steps = 6
  env = subprocess_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  with open(tmp_path / 'ref.log', 'w') as log:
    ref = subprocess.Popen(_main(tmp_path / 'ref', data, steps), cwd=ROOT, env=env,
                           stdout=log, stderr=subprocess.STDOUT)
  victim = tmp_path / 'victim'
  proc = subprocess.Popen(_main(victim, data, steps), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 900
    while not (victim / 'checkpoints' / '2').exists():
      assert proc.poll() is None, 'the run ended before it could be killed'
      assert time.time() < deadline
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ref.wait(timeout=900) == 0, (tmp_path / 'ref.log').read_text()[-3000:]
  finally:
    for p in (proc, ref):
      if p.poll() is None:
        p.kill()
        p.wait()
  done = sorted(int(p.name) for p in (victim / 'checkpoints').iterdir() if p.name.isdigit())
  assert done and done[-1] < steps, done
  again = subprocess.run(_main(victim, data, steps), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step' in again.stderr
  a, b = _params(tmp_path / 'ref', steps), _params(victim, steps)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
