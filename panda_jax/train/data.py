"""Builds the training iterator a config asks for (and, for tiny runs, the data itself)."""

from __future__ import annotations

import json
import logging
import os

import jax

from panda_jax import config as config_lib
from panda_jax.data import pipeline, text


def synthetic_data(config, workdir: str) -> tuple[str, str, str]:
  """Generates (once) the synthetic videos, annotations and a tokenizer under the workdir.

  Returns (annotation file, video root, tokenizer directory).
  """
  from panda_jax.data import synthetic
  root = os.path.join(workdir, 'cache', 'synthetic')
  done = os.path.join(root, 'DONE')
  if not os.path.exists(done):
    logging.info('generating %d synthetic videos under %s', config.data.synthetic_videos, root)
    ds = synthetic.make_dataset(root, config.data.synthetic_videos, seed=config.seed)
    corpus = []
    for key in ('train_captions', 'train_instruct'):
      with open(getattr(ds, key)) as f:
        for entry in json.load(f):
          corpus += [m['value'].replace('<video>', '') for m in entry['conversations']]
    corpus += [text.SYSTEM_PROMPT, 'USER: ASSISTANT:']
    text.build_tokenizer(os.path.join(root, 'tokenizer'), corpus * 2)
    with open(done, 'w') as f:
      f.write('ok\n')
  name = 'train_instruct.json' if config.stage == 3 else 'train_captions.json'
  return os.path.join(root, name), root, os.path.join(root, 'tokenizer')


def data_paths(config, workdir: str) -> tuple[str, str, str]:
  """(annotation file, video root, tokenizer directory) of the configured data set."""
  d = config.data
  if d.annotations:
    annotations, video_root, tok = d.annotations, d.video_root, d.tokenizer
    if not video_root or not tok:
      raise ValueError('data.annotations is set: data.video_root and data.tokenizer are needed '
                       'too')
  elif d.synthetic_videos > 0:
    annotations, video_root, tok = synthetic_data(config, workdir)
  else:
    raise ValueError('no training data: set data.annotations, data.video_root and '
                     'data.tokenizer (or data.synthetic_videos for a synthetic run)')
  return annotations, video_root, tok


def teacher_features_dir(config, workdir: str) -> str:
  """The cached teacher features of a `train.teacher=cached` run ('' for the online teacher).

  `data.teacher_features` names them; a synthetic run without it extracts them once into
  `workdir/cache/teacher_features` (the tiny teacher is initialised from the seed, so they
  equal what the online teacher computes).
  """
  if not config_lib.cached_teacher(config):
    return ''
  from panda_jax.teacher import extract, features
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
  path = os.path.join(workdir, 'cache', 'teacher_features')
  done = os.path.exists(os.path.join(path, features.MANIFEST)) and \
      features.read_manifest(path).get('complete')
  if not done:
    logging.info('extracting the synthetic data set\'s teacher features into %s', path)
    extract.extract(config, path, workdir, progress=False)
  return path


def build_train_iterator(config, workdir: str) -> pipeline.TrainIterator:
  """The training batches: packed shards (`data.packed`) or annotations + videos."""
  d = config.data
  stab = config_lib.stab_config(config.model)
  if d.packed:
    from panda_jax.data import packing
    if not d.packed_config or not d.tokenizer:
      raise ValueError('data.packed is set: data.packed_config (the packed set\'s name, e.g. '
                       '"valley") and data.tokenizer are needed too')
    source = packing.open_packed(d.packed, d.packed_config)
    # Packed sets carry their teacher features inside.
    processor = packing.PackedProcessSample(source, d.tokenizer, stab, d.frames, d.max_len,
                                            teacher_features=config_lib.cached_teacher(config),
                                            system_prompt=d.system_prompt)
    records = packing.packed_records(source)
    where = f'{d.packed} ({d.packed_config})'
  else:
    annotations, video_root, tok = data_paths(config, workdir)
    where = teacher_features_dir(config, workdir)
    records = pipeline.load_annotations(annotations)
    processor = pipeline.ProcessSample(video_root, tok, stab, d.frames, d.max_len,
                                       teacher_features=where, system_prompt=d.system_prompt)
  if processor.teacher_shape and \
      processor.teacher_shape[-1] != config.model.distill.teacher_hidden:
    raise ValueError(f'teacher features in {where} have width '
                     f'{processor.teacher_shape[-1]}; model.distill.teacher_hidden is '
                     f'{config.model.distill.teacher_hidden}')
  return pipeline.TrainIterator(records, processor, config.train.batch_size,
                                seed=d.shuffle_seed, process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                num_workers=d.num_workers)
