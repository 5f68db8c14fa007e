"""Metric writers: the log and TensorBoard event files, without TensorFlow.

clu's default writer (`clu.metric_writers.create_default_writer`) writes TensorBoard events
through `tf.summary`, and the package `clu/metric_writers/__init__.py` imports that writer, so
importing any of clu's writers imports TensorFlow (1.3 GB installed). Here the event files are
written by `tensorboardX` (numpy and protobuf only) in `TensorBoardWriter` (clu's
`MetricWriter` interface), and `create_writer` composes it with clu's `LoggingWriter` and
`AsyncMultiWriter` the way `create_default_writer` does. clu's writer modules are imported
one by one when `create_writer` first runs (not at import), without running that package's
`__init__` (`_import_clu_writers`).

Usage (on every process; only process 0 writes event files):
  writer = create_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, {'loss': 0.5})
  writer.close()
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging


@functools.lru_cache(maxsize=None)
def _import_clu_writers():
  """clu's async_writer, interface, logging_writer and multi_writer modules, imported without
  executing `clu/metric_writers/__init__.py` (which imports TensorFlow).

  The package is registered in `sys.modules` as an empty module with the real package's path
  while its submodules load, then removed again, so a later `import clu.metric_writers`
  elsewhere still gets the full package (and reuses these submodules).
  """
  name = 'clu.metric_writers'
  stub = None
  if name not in sys.modules:
    stub = importlib.util.module_from_spec(importlib.util.find_spec(name))
    sys.modules[name] = stub
  try:
    from clu.metric_writers import async_writer, interface, logging_writer, multi_writer
  finally:
    if stub is not None and sys.modules.get(name) is stub:
      del sys.modules[name]
  return async_writer, interface, logging_writer, multi_writer




def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


class TensorBoardWriter:
  """Writes TensorBoard event files into `logdir` through tensorboardX: every method of clu's
  `MetricWriter` interface (duck-typed: clu's writers are imported only when `create_writer`
  runs).

  Scalars, images, texts, histograms and hyper-parameters; raw summaries, videos and audio are
  not written (a warning, once; the LoggingWriter beside it still logs them).
  """

  def __init__(self, logdir: str):
    super().__init__()
    import tensorboardX
    from tensorboardX import summary as tbx_summary
    self._summary = tbx_summary
    self._writer = tensorboardX.SummaryWriter(logdir=str(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(np.asarray(value)), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]):
    """images: key -> [N, H, W, C] or [H, W, C], C in (1, 3, 4); uint8 in [0, 255] or float
    in [0, 1]. N images are written as one grid."""
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim not in (3, 4) or value.shape[-1] not in (1, 3, 4):
        raise ValueError(f'image {key!r} has shape {list(value.shape)}; expected [N, H, W, C] '
                         f'or [H, W, C] with C in (1, 3, 4)')
      if value.dtype != np.uint8:
        value = value.astype(np.float32)
      if value.ndim == 3:
        self._writer.add_image(key, value, global_step=int(step), dataformats='HWC')
      else:
        self._writer.add_images(key, value, global_step=int(step), dataformats='NHWC')

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, str(value), global_step=int(step))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    """arrays: key -> values of any shape; num_buckets: key -> bucket count (default:
    TensorFlow's exponential buckets)."""
    for key, value in arrays.items():
      buckets = None if num_buckets is None else num_buckets.get(key)
      self._writer.add_histogram(key, np.asarray(value, np.float64).reshape(-1),
                                 global_step=int(step),
                                 bins='tensorflow' if buckets is None else int(buckets))

  def write_hparams(self, hparams: Mapping[str, Any]):
    """Nested hyper-parameters, flattened to `a.b` names, as the run's HParams session (no
    metrics are declared: TensorBoard takes the run's scalars as the metrics). Values other
    than bool, int, float or str are written as their str()."""
    flat = {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
            for k, v in _flatten(hparams).items()}
    _, session_start, _ = self._summary.hparams(flat, {})
    self._writer.file_writer.add_summary(session_start)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    logging.log_first_n(logging.WARNING, 'TensorBoardWriter does not write raw summaries.', 1)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    logging.log_first_n(logging.WARNING, 'TensorBoardWriter does not write videos.', 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    logging.log_first_n(logging.WARNING, 'TensorBoardWriter does not write audio.', 1)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def create_writer(workdir: Optional[str], *, just_logging: bool = False,
                  asynchronous: bool = True):
  """The metric writer of a run: the log, plus TensorBoard event files in `workdir` unless
  `just_logging` (processes other than 0) or `workdir` is None; writes happen on a background
  thread when `asynchronous` (errors surface on the next write or flush)."""
  async_writer, _, logging_writer, multi_writer = _import_clu_writers()
  writers = [logging_writer.LoggingWriter()]
  if not just_logging and workdir is not None:
    writers.append(TensorBoardWriter(workdir))
  if asynchronous:
    return async_writer.AsyncMultiWriter(writers)
  return multi_writer.MultiWriter(writers)
