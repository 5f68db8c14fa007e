"""Metrics: TensorBoard event files written without TensorFlow (panda_jax.train.metrics), read
back with TensorBoard's own event reader."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from tensorboard.backend.event_processing import event_accumulator as ea

from panda_jax.train import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _events(logdir):
  acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0,
                                                        ea.HISTOGRAMS: 0, ea.TENSORS: 0})
  acc.Reload()
  return acc


def test_writer_round_trips_scalars_images_histograms_texts(tmp_path):
  w = metrics.create_writer(str(tmp_path))
  w.write_hparams({'optim': {'lr': 1e-4}, 'stage': 2, 'trainable': ['a', 'b']})
  w.write_scalars(1, {'loss': np.float32(2.5), 'lr': 1e-4})
  w.write_scalars(2, {'loss': np.asarray(1.25)})
  w.write_images(2, {'frames': np.random.default_rng(0).random((3, 8, 6, 3)),
                     'mask': np.zeros((8, 6, 1), np.uint8)})
  w.write_histograms(2, {'grads': np.arange(100.0).reshape(10, 10)}, {'grads': 5})
  w.write_texts(2, {'answer': 'a red square'})
  w.close()
  acc = _events(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(1, 2.5), (2, 1.25)]
  assert acc.Scalars('lr')[0].value == pytest.approx(1e-4)
  grid = acc.Images('frames')[0]
  assert (grid.step, grid.width, grid.height) == (2, 18, 8)   # 3 frames side by side
  assert acc.Images('mask')[0].width == 6
  hist = acc.Histograms('grads')[0]
  assert hist.step == 2 and hist.histogram_value.num == 100
  assert hist.histogram_value.max == 99.0
  assert 'answer/text_summary' in acc.Tags()['tensors']


def test_bad_image_shape_names_it(tmp_path):
  w = metrics.create_writer(str(tmp_path), asynchronous=False)
  with pytest.raises(ValueError, match=r"'frames' has shape \[8, 6\]"):
    w.write_images(0, {'frames': np.zeros((8, 6))})
  w.close()


def test_other_processes_write_no_event_files(tmp_path):
  w = metrics.create_writer(str(tmp_path), just_logging=True)
  w.write_scalars(1, {'loss': 1.0})
  w.close()
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_tiny_run_events_match_the_log_and_tensorflow_is_never_imported(tmp_path):
  """A tiny stage-2 run through the entry point (synthetic data) in a fresh process: its event
  file holds the loss logged at every step, and TensorFlow was never imported."""
  work = tmp_path / 'run'
  code = f"""
import sys
from absl import app
from panda_jax import main
sys.argv = ['panda_jax.main', '--config=configs/stage2.py:tiny', '--workdir={work}',
            '--config.train.steps={STEPS}', '--config.train.log_every=1',
            '--config.model.stab.dropout=0.0']
try:
  app.run(main.main)
finally:
  print('tensorflow imported:', 'tensorflow' in sys.modules, flush=True)
"""
  env = subprocess_env(PYTHONPATH=ROOT)   # one device, this session's compilation cache
  run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'tensorflow imported: False' in run.stdout, run.stdout[-2000:]

  logged = {int(s): float(l) for s, l in
            re.findall(rf'step (\d+)/{STEPS} loss ([0-9.]+)', run.stderr)}
  assert sorted(logged) == list(range(1, STEPS + 1)), run.stderr[-3000:]
  final = float(re.search(rf'finished at step {STEPS} with loss ([0-9.]+)', run.stdout)[1])
  acc = _events(work)
  loss = {e.step: e.value for e in acc.Scalars('loss')}
  assert sorted(loss) == sorted(logged)
  for step, value in logged.items():
    assert round(loss[step], 4) == pytest.approx(value, abs=1e-4), (step, loss[step], value)
  assert round(loss[STEPS], 4) == pytest.approx(final, abs=1e-4)
  for tag in ('ce', 'distill', 'grad_norm', 'steps_per_s', 'tokens_per_s'):
    assert [e.step for e in acc.Scalars(tag)] == list(range(1, STEPS + 1)), tag
