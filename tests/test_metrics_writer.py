"""Metrics: TensorBoard event files written without TensorFlow (panda_jax.train.metrics), read
back with TensorBoard's own event reader. (A real run's events against its log, TensorFlow never
imported: tests/test_demo.py, on the demo's run.)"""

import os

import numpy as np
import pytest

from tensorboard.backend.event_processing import event_accumulator as ea

from panda_jax.train import metrics



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
