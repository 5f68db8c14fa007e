"""Host cost of one training sample of the demo: record -> arrays (`pipeline.ProcessSample`).

The demo's stage-3 data set (`configs/demo.py`: 112 x 84 clips of 4 frames, three-question
conversations), made once under --workdir, and per sample, in this one process (no reader
threads), interleaved over --runs rounds of --samples samples each:

  before  every frame converted to RGB by a converter built for it
          (`frame.to_ndarray(format='rgb24')`) and every piece of text tokenized again: the
          pipeline until 2026-12-03
  ours    one converter kept per thread (`video._to_rgb`) and the tokenizer's ids of a string
          remembered (`text.MemoTokenizer`)

Both give the same arrays (checked on every sample here; tests/test_video.py and
tests/test_text.py check it too). Also the cost split by part for `ours` (decode, preprocess,
tokenize). The demo's training step runs on the same two cores as its reader threads, so what
a sample costs here is taken from the step's time.

  python benchmarks/sample_cost.py                 # ~1 minute, plus the data set once
  python benchmarks/sample_cost.py --samples 400 --runs 5

The last line is `RESULT ms_per_sample_before=<x> ms_per_sample_ours=<y> speedup=<x/y>`.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from panda_jax import config as config_lib  # noqa: E402
from panda_jax.data import pipeline, text, video  # noqa: E402
from panda_jax.data.sources import data_paths  # noqa: E402
from panda_jax.demo import run as demo_run  # noqa: E402


def _fresh_rgb(frame):
  return frame.to_ndarray(format='rgb24')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', default='/tmp/panda_sample_cost')
  ap.add_argument('--clips', type=int, default=400, help='training clips of the data set')
  ap.add_argument('--samples', type=int, default=200, help='samples per round and variant')
  ap.add_argument('--runs', type=int, default=3, help='rounds (variants interleaved)')
  args = ap.parse_args()

  config = demo_config.get_config('')
  with config.unlocked():
    config.data.train_clips = args.clips
    config.data.eval_clips = 8
  data = demo_run.make_data(config, os.path.join(args.workdir, 'data'), progress=False)
  stage = demo_run.stage_config(config, 3, data, '')
  run = config_lib.resolve(stage)
  annotations, root, tokenizer = data_paths(stage, args.workdir)
  records = pipeline.load_annotations(annotations)[:args.samples]
  d = stage.data
  ours = pipeline.ProcessSample(root, tokenizer, run.model.stab, d.frames, d.max_len,
                                system_prompt=d.system_prompt)
  before = pipeline.ProcessSample(root, tokenizer, run.model.stab, d.frames, d.max_len,
                                  system_prompt=d.system_prompt)
  before.tokenizer = before.tokenizer._tokenizer          # the tokenizer itself, no memory
  kept_rgb = video._to_rgb

  def one_round(variant):
    process = ours if variant == 'ours' else before
    video._to_rgb = kept_rgb if variant == 'ours' else _fresh_rgb
    try:
      t0 = time.perf_counter()
      out = [process(r) for r in records]
      return (time.perf_counter() - t0) / len(records) * 1e3, out
    finally:
      video._to_rgb = kept_rgb

  one_round('ours'), one_round('before')          # warm: files cached, converters built
  times = {'before': [], 'ours': []}
  for _ in range(args.runs):
    for variant in ('before', 'ours'):
      ms, out = one_round(variant)
      times[variant].append(ms)
      if variant == 'before':
        reference = out
      else:
        for a, b in zip(reference, out):
          assert a.keys() == b.keys()
          for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # Where a sample's time goes (ours).
  parts = {'decode': 0.0, 'preprocess': 0.0, 'tokenize': 0.0}
  for r in records:
    t0 = time.perf_counter()
    text.tokenize_conversation(ours.tokenizer, text.as_turns(r['conversations']),
                               num_frames=d.frames, system=ours.system)
    t1 = time.perf_counter()
    frames = ours.decode(r, os.path.join(root, r['video']))
    t2 = time.perf_counter()
    video.preprocess_frames(frames, num=d.frames, size=run.model.stab.image_size,
                            teacher_size=run.model.stab.image_size // 2,
                            patch=run.model.stab.patch_size)
    t3 = time.perf_counter()
    parts['tokenize'] += t1 - t0
    parts['decode'] += t2 - t1
    parts['preprocess'] += t3 - t2
  n = len(records)
  b, o = statistics.median(times['before']), statistics.median(times['ours'])
  print(f'{n} demo samples ({d.frames} frames of {config.data.width} x {config.data.height}, '
        f'three-question conversations), median of {args.runs} rounds, one process\n')
  print('| | ms per sample | samples per s | vs before |')
  print('|---|---:|---:|---:|')
  print(f'| before (a converter per frame, no remembered text) | {b:.2f} | {1e3 / b:.0f} | 1.00 |')
  print(f'| ours | {o:.2f} | {1e3 / o:.0f} | {b / o:.2f} |')
  print('\nours by part (ms per sample): ' + ', '.join(
      f'{k} {v / n * 1e3:.2f}' for k, v in parts.items()))
  print(f'RESULT ms_per_sample_before={b:.3f} ms_per_sample_ours={o:.3f} speedup={b / o:.3f}')


if __name__ == '__main__':
  main()
