"""Host cost of one training sample of the demo: record -> arrays (`pipeline.ProcessSample`).

The demo's stage-3 data set (`configs/demo.py`: 112 x 84 clips of 4 frames, three-question
conversations), made once under --workdir, and per sample, in this one process (no reader
threads), interleaved over --runs rounds of --samples samples each:

  before  every frame converted to RGB by a converter built for it
          (`frame.to_ndarray(format='rgb24')`), every piece of text tokenized again and every
          pixel normalised by arithmetic: the pipeline until 2026-12-03
  ours    one converter kept per thread (`video._to_rgb`), the tokenizer's ids of a string
          remembered (`text.MemoTokenizer`), pixels normalised by looking their value up
          (`frames.normalise`): a clip's first sample
  cached  ours with `data.video_cache_mb` (`pipeline.VideoCache`), the clip decoded and padded
          by an earlier sample: every later sample of a clip (the demo sets it)

All three give the same arrays (checked on every sample here; tests/test_video.py,
tests/test_text.py, tests/test_frames.py and tests/test_pipeline.py check it too). Also the
cost split by part for `ours` (decode, preprocess, tokenize). The demo's training step runs on
the same two cores as its reader threads, so what a sample costs here is taken from the step's
time.

  python benchmarks/sample_cost.py                 # ~1 minute, plus the data set once
  python benchmarks/sample_cost.py --samples 400 --runs 5

The last line is `RESULT ms_per_sample_before=<x> ms_per_sample_ours=<y> ms_per_sample_cached=<z>
speedup=<x/y> speedup_cached=<x/z>`.
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
from panda_jax.data import frames as frames_lib, pipeline, text, video  # noqa: E402
from panda_jax.data.sources import data_paths  # noqa: E402
from panda_jax.demo import run as demo_run  # noqa: E402


def _fresh_rgb(frame):
  return frame.to_ndarray(format='rgb24')


def _arithmetic_normalise(canvas):
  return (canvas.astype(np.float32) / 255.0 - frames_lib.CLIP_MEAN) / frames_lib.CLIP_STD


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
    config.data.val_clips = config.data.test_clips = config.data.novel_clips = 8
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
  cached = pipeline.ProcessSample(root, tokenizer, run.model.stab, d.frames, d.max_len,
                                  system_prompt=d.system_prompt, video_cache_mb=4096)
  kept_rgb, lookup = video._to_rgb, video.normalise
  processors = {'before': before, 'ours': ours, 'cached': cached}

  def one_round(variant):
    video._to_rgb = _fresh_rgb if variant == 'before' else kept_rgb
    video.normalise = _arithmetic_normalise if variant == 'before' else lookup
    try:
      t0 = time.perf_counter()
      out = [processors[variant](r) for r in records]
      return (time.perf_counter() - t0) / len(records) * 1e3, out
    finally:
      video._to_rgb, video.normalise = kept_rgb, lookup

  for variant in processors:      # warm: files in the page cache, converters built, and the
    one_round(variant)            # clips of `cached` in its cache
  assert pipeline.VIDEO_CACHE.stats()['clips'] == len({r['video'] for r in records})
  times = {v: [] for v in processors}
  for _ in range(args.runs):
    for variant in processors:
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
  b, o, c = (statistics.median(times[v]) for v in ('before', 'ours', 'cached'))
  print(f'{n} demo samples ({d.frames} frames of {config.data.width} x {config.data.height}, '
        f'three-question conversations), median of {args.runs} rounds, one process\n')
  print('| | ms per sample | samples per s | vs before |')
  print('|---|---:|---:|---:|')
  print(f'| before (a converter per frame, no remembered text, arithmetic normalisation) | '
        f'{b:.2f} | {1e3 / b:.0f} | 1.00 |')
  print(f'| ours, a clip\'s first sample | {o:.2f} | {1e3 / o:.0f} | {b / o:.2f} |')
  print(f'| ours, the clip cached (`data.video_cache_mb`) | {c:.2f} | {1e3 / c:.0f} | '
        f'{b / c:.2f} |')
  print('\nours by part (ms per sample): ' + ', '.join(
      f'{k} {v / n * 1e3:.2f}' for k, v in parts.items()))
  print(f'RESULT ms_per_sample_before={b:.3f} ms_per_sample_ours={o:.3f} '
        f'ms_per_sample_cached={c:.3f} speedup={b / o:.3f} speedup_cached={b / c:.3f}')


if __name__ == '__main__':
  main()
