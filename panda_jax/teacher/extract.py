"""Runs the frozen teacher once over a data set and caches its features for training.

  python -m panda_jax.teacher.extract --config=configs/stage2.py [--config.x=...] \\
      [--out=DIR] [--workdir=DIR] [--batch_size=8] [--dtype=float32]

Reads the same annotations, video root and teacher the training config names (`data.*`,
`model.teacher`, `init.teacher`), decodes every distinct video once with the training
sampler and preprocessing (Grain, host threads), runs the teacher on batches of videos
sharded over this host's devices, and writes one feature file per video under `--out`
(default: `data.teacher_features`) in the layout of `panda_jax.data.teacher_features`. Train on them
with `--config.train.teacher=cached --config.data.teacher_features=DIR`.

Resumable: videos whose feature file exists are skipped, so an interrupted run is restarted
with the same command. Videos that cannot be decoded are counted, listed in `failures.json`
and skipped (training skips them too). On a multi-host pod every host runs the command and
extracts its own 1/process_count of the videos on its local devices (`--multihost`, with
`--coordinator_address --num_processes --process_id` where JAX cannot detect them; on one
machine: `LOCAL_MODULE=panda_jax.teacher.extract launch/local.sh N K ...`); each process
writes `done.<i>-of-<n>.json` when its share is done, and the last to finish marks the
features `complete` in the manifest.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from panda_jax import storage
from panda_jax.data import teacher_features as features_lib


# Each process extracts alone on its own devices, all of them on the `data` axis of a local
# mesh, so the videos of a batch are split over them whatever the training rules say.
LOCAL_RULES = (('batch', 'data'),)
# `<out>/done.<i>-of-<n>.json`: process i of n finished its share (see `extract`).
DONE_PREFIX = 'done.'


def _local_mesh():
  import jax
  from jax.sharding import Mesh
  from panda_jax.sharding import MESH_AXES
  devices = np.array(jax.local_devices()).reshape(-1, 1, 1)
  return Mesh(devices, MESH_AXES)


def _done_name(index: int, count: int) -> str:
  return f'{DONE_PREFIX}{index}-of-{count}.json'


def extract(config, out: str, workdir: str = '', batch_size: int = 0,
            dtype: str = 'float32', progress: bool = True, run=None,
            process: tuple[int, int] | None = None) -> dict:
  """Writes the teacher features of every video of the configured data set under `out`.

  `run`: the config resolved by the caller (resolved here when not given). `process`: (index,
  count) of this process among those sharing the work (default: JAX's). Returns counts:
  `videos` (distinct videos of this process's share), `written`, `existing` (skipped: already
  there), `failed` (undecodable), and `complete` (whether every process's share is now done).
  """
  import jax

  from panda_jax import config as config_lib
  from panda_jax.data import pipeline
  from panda_jax.data.sources import data_paths

  if dtype not in features_lib.DTYPES:
    raise ValueError(f'--dtype={dtype!r}; expected one of {features_lib.DTYPES}')
  run = run or config_lib.resolve(config)
  index, count = process or (jax.process_index(), jax.process_count())
  if not 0 <= index < count:
    raise ValueError(f'process index {index} of {count} processes')
  stab, tc = run.model.stab, run.teacher
  if tc.grid != stab.target_grid:
    raise ValueError(f'the teacher\'s {tc.grid}x{tc.grid} patch grid does not match the '
                     f'student\'s {stab.target_grid}x{stab.target_grid} distillation grid '
                     f'(patch grid / lsd_stride)')
  annotations, video_root, _ = data_paths(config, workdir)
  records = pipeline.load_annotations(annotations)
  every = sorted({r['video'] for r in records})
  videos = every[index::count]

  manifest = _open_features(config, tc, dtype, annotations, out, index)
  # This process's share is not done until its marker is written again at the end.
  done_path = storage.join(out, _done_name(index, count))
  storage.remove(done_path)

  todo = [v for v in videos
          if not storage.exists(features_lib.feature_path(out, v))]
  mesh = _local_mesh()
  n_dev = mesh.devices.size
  batch = batch_size or -(-8 // n_dev) * n_dev      # 8 videos, rounded up to the devices
  if batch % n_dev:
    raise ValueError(f'--batch_size={batch} is not a multiple of the {n_dev} local devices')
  written, failures = 0, []
  if todo:
    written, failures = _extract_videos(config, run, mesh, todo, video_root, out, batch, dtype,
                                        progress)
  name = features_lib.FAILURES if count == 1 else f'{features_lib.FAILURES}.{index}'
  storage.write_json(storage.join(out, name), failures, indent=1)
  storage.write_json(done_path, {'videos': len(videos), 'failed': len(failures),
                                 'of': len(every)})
  return {'videos': len(videos), 'existing': len(videos) - len(todo), 'written': written,
          'failed': len(failures), 'complete': _mark_complete(out, count, len(every), manifest)}


def _open_features(config, tc, dtype: str, annotations: str, out: str, index: int) -> dict:
  """The features' manifest (not yet complete); refuses an `out` holding another teacher's or
  another sampling's features, and writes it there from process 0."""
  frames = config.data.frames
  manifest = {'frames': frames, 'grid': tc.grid, 'hidden': tc.hidden, 'dtype': dtype,
              'teacher': config.model.teacher.to_dict(), 'teacher_init': config.init.teacher,
              'annotations': os.path.abspath(annotations), 'complete': False}
  if storage.exists(storage.join(out, features_lib.MANIFEST)):
    old = features_lib.read_manifest(out)
    features_lib.check_manifest(old, frames, tc.grid, tc.hidden, out)
    if old.get('teacher') != manifest['teacher'] or \
        old.get('teacher_init') != manifest['teacher_init']:
      raise features_lib.FeatureError(
          f'{out} holds features of another teacher ({old.get("teacher_init")!r}, '
          f'{old.get("teacher")}); use a new --out')
  storage.makedirs(out)
  if index == 0:
    features_lib.write_manifest(out, manifest)
  return manifest


def _extract_videos(config, run, mesh, todo, video_root: str, out: str, batch: int, dtype: str,
                    progress: bool) -> tuple[int, list]:
  """Decodes the videos `todo` (Grain, host threads), runs the teacher on batches of `batch`
  sharded over `mesh` and saves one feature file per video; returns (written, failures: one
  {video, path, reason} per undecodable video)."""
  import grain
  import jax
  from tqdm import tqdm

  from panda_jax import sharding
  from panda_jax.data.video import VideoDecodeError, load_video
  from panda_jax.teacher.model import create_teacher

  stab, tc, frames = run.model.stab, run.teacher, config.data.frames
  teacher, params, _ = create_teacher(run, mesh, config.seed, frames, config.init.teacher,
                                      config.init.teacher_prefix)
  batch_sh = sharding.batch_sharding(mesh, 5, LOCAL_RULES)
  apply = jax.jit(lambda p, x: teacher.apply({'params': p}, x))

  def decode(video):
    try:
      v = load_video(os.path.join(video_root, video), num=frames, size=stab.image_size,
                     teacher_size=tc.image_size, patch=stab.patch_size)
      return video, v['teacher_pixels'], None
    except VideoDecodeError as e:
      return video, None, e.reason

  ds = grain.MapDataset.source(todo).map(decode).to_iter_dataset()
  shape = (batch, frames, tc.image_size, tc.image_size, 3)
  bar = tqdm(total=len(todo), desc='teacher features', unit='video', disable=not progress,
             file=sys.stderr)
  t0 = time.perf_counter()
  pending: list = []
  failures: list = []
  written = 0

  def flush():
    nonlocal written
    x = np.zeros(shape, np.float32)
    for i, (_, px) in enumerate(pending):
      x[i] = px
    feats = np.asarray(jax.device_get(apply(params, jax.device_put(x, batch_sh))))
    for i, (video, _) in enumerate(pending):
      features_lib.save(features_lib.feature_path(out, video), feats[i], dtype)
    written += len(pending)
    bar.update(len(pending))
    pending.clear()

  with jax.set_mesh(mesh):
    for video, px, err in ds:
      if err is not None:
        failures.append({'video': video, 'path': os.path.join(video_root, video),
                         'reason': err})
        logging.warning('teacher features: skipped %s: %s', video, err)
        bar.update(1)
        continue
      pending.append((video, px))
      if len(pending) == batch:
        flush()
    if pending:
      flush()
  bar.close()
  dt = time.perf_counter() - t0
  logging.info('teacher features: %d written in %.1fs (%.2f videos/s), %d failed',
               written, dt, written / max(dt, 1e-9), len(failures))
  return written, failures


def _mark_complete(out: str, count: int, total: int, manifest: dict) -> bool:
  """Whether every one of the `count` processes' shares is done; if so, marks the features
  complete in the manifest.

  Each process marks its share done; whichever finds every share done (the last to finish)
  marks the features complete. A marker counts only for the same number of processes and the
  same data set (`total`, its video count), so one left by another run of the tool does not.
  A marker that is missing means a share not done yet; one that does not parse is an error
  (markers are written atomically), named by `storage.read_json`.
  """
  shares = []
  for i in range(count):
    try:
      shares.append(storage.read_json(storage.join(out, _done_name(i, count))))
    except FileNotFoundError:
      return False
  if not (all(m.get('of') == total for m in shares) and
          sum(m['videos'] for m in shares) == total):
    return False
  features_lib.write_manifest(out, dict(manifest, complete=True,
                                        failed=sum(m['failed'] for m in shares)))
  return True


def main(argv):
  from absl import app, flags
  del argv
  cfg = flags.FLAGS.config
  if cfg is None:
    raise app.UsageError('--config is required, e.g. --config=configs/stage2.py')
  out = flags.FLAGS.out or cfg.data.teacher_features
  if not out:
    raise app.UsageError('say where the features go: --out=DIR or '
                         '--config.data.teacher_features=DIR')
  from panda_jax import distributed
  distributed.from_flags()
  stats = extract(cfg, out, flags.FLAGS.workdir or '', flags.FLAGS.batch_size,
                  flags.FLAGS.dtype)
  print(f'teacher features in {out}: {stats["videos"]} videos, {stats["written"]} written, '
        f'{stats["existing"]} already there, {stats["failed"]} undecodable '
        f'(listed in {storage.join(out, features_lib.FAILURES)}); '
        + ('complete' if stats['complete'] else 'other processes\' shares not done yet'))


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Training config (configs/X.py[:arg]).',
                                  lock_config=True)
  flags.DEFINE_string('out', '', 'Features directory (default: data.teacher_features).')
  flags.DEFINE_string('workdir', '', 'Workdir of a synthetic (:tiny) run, whose generated '
                      'data set lives under it.')
  flags.DEFINE_integer('batch_size', 0, 'Videos per teacher call (default: 8, rounded to the '
                       'local device count).')
  flags.DEFINE_enum('dtype', 'float32', list(features_lib.DTYPES), 'Storage dtype.')
  from panda_jax import distributed
  distributed.define_flags()
  app.run(main)
