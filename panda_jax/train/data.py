"""Builds the training iterator a config asks for (and, for tiny runs, the data itself)."""

from __future__ import annotations

import logging

import jax

from panda_jax import config as config_lib
from panda_jax import storage
from panda_jax.data import pipeline
from panda_jax.data import teacher_features as features
from panda_jax.data.sources import data_paths


def teacher_features_dir(config, run: config_lib.Run, workdir: str) -> str:
  """The cached teacher features of a `train.teacher=cached` run ('' for the online teacher).

  `data.teacher_features` names them; a synthetic run without it extracts them once into
  `workdir/cache/teacher_features` (the tiny teacher is initialised from the seed, so they
  equal what the online teacher computes).
  """
  if not run.cached_teacher:
    return ''
  path = config.data.teacher_features
  if path:
    manifest = features.read_manifest(path)
    if not manifest.get('complete'):
      logging.warning('teacher features in %s are incomplete (extraction did not finish): '
                      'videos without features will be skipped', path)
    return path
  if config.data.annotations or config.data.synthetic_videos <= 0:
    raise ValueError('train.teacher=cached needs data.teacher_features (a directory written '
                     'by python -m panda_jax.teacher.extract)')
  path = storage.scratch_dir(workdir, 'teacher_features')
  done = storage.exists(storage.join(path, features.MANIFEST)) and \
      features.read_manifest(path).get('complete')
  if not done:
    from panda_jax.teacher import extract
    logging.info('extracting the synthetic data set\'s teacher features into %s', path)
    extract.extract(config, path, workdir, progress=False, run=run)
  return path


def build_train_iterator(config, workdir: str,
                         run: config_lib.Run | None = None) -> pipeline.TrainIterator:
  """The training batches: packed shards (`data.packed`) or annotations + videos. `run`: the
  config resolved by the caller (resolved here when not given)."""
  run = run or config_lib.resolve(config)
  d = config.data
  stab = run.model.stab
  if d.packed:
    from panda_jax.data import packing
    if d.get('video_cache_mb', 0):
      raise ValueError(f'data.video_cache_mb={d.video_cache_mb}: the cache keeps clips decoded '
                       'from video files; a packed set (data.packed) reads its frames from '
                       'shards. Set data.video_cache_mb=0.')
    if not d.packed_config or not d.tokenizer:
      raise ValueError('data.packed is set: data.packed_config (the packed set\'s name, e.g. '
                       '"valley") and data.tokenizer are needed too')
    source = packing.open_packed(d.packed, d.packed_config)
    # Packed sets carry their teacher features inside.
    processor = packing.PackedProcessSample(source, d.tokenizer, stab, d.frames, d.max_len,
                                            teacher_features=run.cached_teacher,
                                            system_prompt=d.system_prompt)
    records = packing.packed_records(source)
    where = f'{d.packed} ({d.packed_config})'
  else:
    annotations, video_root, tok = data_paths(config, workdir)
    where = teacher_features_dir(config, run, workdir)
    records = pipeline.load_annotations(annotations)
    processor = pipeline.ProcessSample(video_root, tok, stab, d.frames, d.max_len,
                                       teacher_features=where, system_prompt=d.system_prompt,
                                       video_cache_mb=d.get('video_cache_mb', 0))
  if processor.teacher_shape and processor.teacher_shape[-1] != run.teacher.hidden:
    raise ValueError(f'teacher features in {where} have width '
                     f'{processor.teacher_shape[-1]}; model.teacher.hidden is '
                     f'{run.teacher.hidden}')
  return pipeline.TrainIterator(records, processor, config.train.batch_size,
                                seed=d.shuffle_seed, process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                num_workers=d.num_workers,
                                read_threads=d.read_threads)
