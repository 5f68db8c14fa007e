"""Where a config's training data lives: annotations + videos + tokenizer, or a synthetic set
generated (once) under the workdir for tiny runs."""

from __future__ import annotations

import json
import logging
import os

from panda_jax import storage
from panda_jax.data import text


def synthetic_data(config, workdir: str) -> tuple[str, str, str]:
  """Generates (once) the synthetic videos, annotations and a tokenizer under the workdir
  (`storage.scratch_dir`: on this host when the workdir is a URI).

  Returns (annotation file, video root, tokenizer directory).
  """
  from panda_jax.data import synthetic
  root = storage.scratch_dir(workdir, 'synthetic')
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
