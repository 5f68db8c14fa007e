"""Checks a data set before a run: which videos are missing or unreadable, and what fits.

  python -m panda_jax.data.check --annotations=FILE --video_root=DIR [--tokenizer=DIR]
      [--frames=8] [--max_len=4096] [--image_size=448] [--report=PATH] [--workers=N]
      [--answers=FILE] [--model_size=7b] [--timeout_s=30]

The annotation file is a training conversation file (`pipeline.load_annotations`) or a VideoQA
file (`qa.load_qa`); the first entry's keys say which. Every distinct video is decoded and
preprocessed exactly as the training pipeline does (`video.load_video`: the authors' frame
rule, the time budget) and classified good, missing or unreadable (with the decoder's reason);
a truncated or corrupt file counts as unreadable even where its header opens. An error that is
not the file's (a bug in decoding or preprocessing) stops the check with its traceback, as it
would stop training. Printed: the
counts, the frame-count and duration distributions, an aspect-ratio histogram, and with a
tokenizer the length of each sample's assembled sequence (text tokens plus every frame's
visual tokens, as `pipeline.ProcessSample` computes it) and how many exceed `max_len`.
Conversations the pipeline would skip (no placeholder, speakers out of order, a tokenization
mismatch) are listed too. A JSON report (default `<annotations>.check.json`) lists every
problem with its reason, and the statistics.

Exit status 0 whatever the videos hold; 2 when the check cannot start: the annotation file
itself is invalid (the AnnotationError on stderr), or a flag or the tokenizer directory is.
With `--workers` > 1 the videos are decoded in that many processes; a decoder stuck inside one
C call (which the time budget cannot interrupt) stalls its worker.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import tqdm

from panda_jax.data import qa as qa_lib
from panda_jax.data import text
from panda_jax.data.pipeline import AnnotationError, load_annotations, read_json_list
from panda_jax.data.video import VideoDecodeError, load_video
from panda_jax.models.stab import StabConfig, frame_grid, frame_layout

FORMATS = ('conversation', 'qa')
# max(w, h) / min(w, h) up to this counts as square.
SQUARE_TOLERANCE = 1.05


def detect_format(path: str) -> str:
  """'conversation' or 'qa', from the keys of the file's first entry."""
  data = read_json_list(path)
  if not data:
    raise AnnotationError(f'{path}: the file holds no samples (an empty list)')
  first = data[0]
  if not isinstance(first, dict):
    raise AnnotationError(f'{path}: entry 0: expected an object, got {type(first).__name__}')
  if 'conversations' in first:
    return 'conversation'
  if 'video_name' in first or 'question' in first:
    return 'qa'
  raise AnnotationError(f'{path}: entry 0 has keys {sorted(first)}; expected a training '
                        'conversation ("video", "conversations") or a VideoQA question '
                        '("video_name", "question", "question_id", "answer")')


def load_samples(annotations: str, video_root: str, answers: str | None = None
                 ) -> tuple[str, list[dict]]:
  """(format, samples): each sample has `index`, `id`, `name` (the video as written), `path`
  (the file under `video_root`, None for a VideoQA name that matches no file) and
  `conversations`. Raises AnnotationError for an invalid file."""
  fmt = detect_format(annotations)
  samples = []
  if fmt == 'conversation':
    if answers is not None:
      raise AnnotationError(f'{annotations}: an answers file ({answers}) only goes with a '
                            'VideoQA questions file, not with training conversations')
    for i, e in enumerate(load_annotations(annotations)):
      samples.append({'index': i, 'id': e.get('id'), 'name': e['video'],
                      'path': os.path.join(video_root, e['video']),
                      'conversations': e['conversations']})
  else:
    records = qa_lib.qa_records(qa_lib.load_qa(annotations, answers), video_root)
    for i, r in enumerate(records):
      samples.append({'index': i, 'id': r['question_id'], 'name': r['video_name'],
                      'path': None if r['video'] is None else os.path.join(video_root,
                                                                          r['video']),
                      'conversations': qa_lib.as_conversation(r)})
  return fmt, samples


def visual_tokens(mask: np.ndarray, stab: StabConfig) -> int:
  """Sequence slots the visual tokens of a clip take: mask [F, H, W] -> sum of frame lengths."""
  hw, _ = frame_grid(mask, stab, xp=np)
  return int(frame_layout(hw, stab.lsd_grid, xp=np, row_token=stab.row_token)['length'].sum())


def probe_video(path: str, frames: int, stab: StabConfig, timeout_s: float | None) -> dict:
  """Decodes and preprocesses one video as the training pipeline does.

  Returns {'path', 'status': 'good' | 'missing' | 'unreadable', 'reason'} and, when good,
  n_frames, fps, duration_s, width, height, codec, visual_tokens. Unreadable means a
  `VideoDecodeError` (the file's own failure, the pipeline's `bad_video` skip); any other
  error is a bug and propagates, as it does from the training pipeline.
  """
  if not os.path.exists(path):
    return {'path': path, 'status': 'missing', 'reason': 'missing: no such file'}
  try:
    v = load_video(path, num=frames, size=stab.image_size, teacher_size=stab.image_size // 2,
                   patch=stab.patch_size, timeout_s=timeout_s)
  except VideoDecodeError as e:
    return {'path': path, 'status': 'unreadable', 'reason': e.reason}
  info = v['info']
  return {'path': path, 'status': 'good', 'reason': None, 'n_frames': int(info['n_frames']),
          'fps': float(info['fps']), 'duration_s': float(info['n_frames'] / info['fps']),
          'width': int(info['width']), 'height': int(info['height']), 'codec': info['codec'],
          'visual_tokens': visual_tokens(v['mask'], stab)}


def _probe_star(args):
  return probe_video(*args)


def _text_length(conversation, tokenizer, frames: int) -> tuple[int | None, str | None]:
  """(text tokens without the frames' placeholders, None) or (None, why it is unusable).

  Without a tokenizer only the template checks run and the length is None. Unusable: a
  `text.ConversationError`, what the pipeline skips as `bad_conversation`; any other error
  propagates.
  """
  try:
    if tokenizer is None:
      text.build_prompt(text.expand_placeholders(conversation, frames))
      return None, None
    ids, _ = text.tokenize_conversation(tokenizer, conversation, num_frames=frames)
  except text.ConversationError as e:
    return None, str(e)[:300]
  return len(ids) - frames, None


def _dist(values: Sequence[float], digits: int = 2) -> dict | None:
  if not len(values):
    return None
  a = np.asarray(values, np.float64)
  r = lambda x: round(float(x), digits)  # noqa: E731
  return {'count': int(len(a)), 'min': r(a.min()), 'median': r(np.median(a)),
          'p95': r(np.percentile(a, 95)), 'max': r(a.max()), 'mean': r(a.mean())}


def aspect_bucket(width: int, height: int) -> str:
  """'landscape', 'portrait' or 'square' (sides within SQUARE_TOLERANCE of each other)."""
  if max(width, height) <= SQUARE_TOLERANCE * min(width, height):
    return 'square'
  return 'landscape' if width > height else 'portrait'


def _start_probes(paths: Sequence[str], frames: int, stab: StabConfig, timeout_s,
                  workers: int):
  """(iterator over probe results, pool or None); with a pool the work starts at once."""
  jobs = [(p, frames, stab, timeout_s) for p in paths]
  if workers <= 1 or len(jobs) <= 1:
    return (probe_video(*job) for job in jobs), None
  # forkserver: workers fork from a clean process that imported this module once, so they
  # start fast and inherit no threads (tqdm's monitor, the tokenizer's, JAX's). The function
  # is named through the package so that it unpickles when this file runs as __main__.
  from panda_jax.data import check as module  # pylint: disable=import-outside-toplevel
  ctx = multiprocessing.get_context('forkserver')
  ctx.set_forkserver_preload([module.__name__])
  pool = ctx.Pool(min(workers, len(jobs)))
  return pool.imap_unordered(module._probe_star, jobs, chunksize=1), pool


def check(annotations: str, video_root: str, tokenizer: str | Any | None = None,
          frames: int = 8, max_len: int = 4096, image_size: int | None = None,
          stab: StabConfig | None = None, report: str | None = '', workers: int = 1,
          timeout_s: float | None = 30.0, answers: str | None = None,
          progress: bool = True) -> dict:
  """Checks a data set; returns the report (also written to `report` as JSON).

  Args:
    annotations: a training conversation file or a VideoQA file.
    video_root: the directory the videos' paths are relative to.
    tokenizer: a tokenizer directory (or a loaded tokenizer); None skips token lengths.
    frames: frames per video (a multiple of 4), as the training config's `data.frames`.
    max_len: longest assembled sequence, as `data.max_len`.
    image_size: the student's frame size (default: `stab`'s, else 448).
    stab: the STAB geometry (patch size, empty-frame region); default the 7B's.
    report: where to write the JSON report; '' -> `<annotations>.check.json`, None -> nowhere.
    workers: processes decoding videos (<= 1: this process).
    timeout_s: per-video decoding budget (the pipeline's default).
    answers: for a VideoQA questions-only file, its answers file.
    progress: show progress bars on stderr.
  Raises:
    AnnotationError when the annotation file is invalid; ValueError / FileNotFoundError for a
    bad setting or a tokenizer that cannot load or cannot write the v1 template, all before any
    video is read (`_setup`). Anything raised after is a bug and propagates.
  """
  return _scan(_setup(annotations, video_root, tokenizer, frames, max_len, image_size, stab,
                      answers), report, workers, timeout_s, progress)


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What `check` reads before any video: the validated settings, samples and tokenizer."""
  annotations: str
  video_root: str
  tokenizer: str | Any | None   # as given (the report names it)
  frames: int
  max_len: int
  stab: StabConfig
  answers: str | None
  fmt: str
  samples: list[dict]
  tok: Any                      # the loaded tokenizer, or None


def _setup(annotations, video_root, tokenizer, frames, max_len, image_size, stab,
           answers) -> _Setup:
  """Validates `check`'s settings and reads the annotations and the tokenizer: every error that
  means the check cannot start (AnnotationError, ValueError, FileNotFoundError)."""
  if frames < 4 or frames % 4:
    raise ValueError(f'frames={frames} must be a positive multiple of 4 (chunks of 4 frames)')
  if max_len < 1:
    raise ValueError(f'max_len={max_len} must be positive')
  if not os.path.isdir(video_root):
    raise ValueError(f'video_root={video_root!r} is not a directory')
  stab = stab or StabConfig()
  if image_size is not None:
    stab = dataclasses.replace(stab, image_size=int(image_size))
  stab.validate()
  fmt, samples = load_samples(annotations, video_root, answers)
  tok = tokenizer
  if isinstance(tokenizer, (str, os.PathLike)):
    tok = text.load_tokenizer(tokenizer, model_max_length=10 ** 6)
  if tok is not None:   # once here, not as every sample's error
    text.check_tokenizer(tok, where=f'tokenizer {os.fspath(tokenizer)}'
                         if isinstance(tokenizer, (str, os.PathLike)) else 'tokenizer')
  return _Setup(annotations, video_root, tokenizer, frames, max_len, stab, answers, fmt,
                samples, tok)


def _scan(setup: _Setup, report: str | None, workers: int, timeout_s: float | None,
          progress: bool) -> dict:
  """`check` once `_setup` has passed: decodes the videos, tokenizes the conversations, and
  writes the report."""
  annotations, video_root, tokenizer = setup.annotations, setup.video_root, setup.tokenizer
  frames, max_len, stab, answers = setup.frames, setup.max_len, setup.stab, setup.answers
  fmt, samples, tok = setup.fmt, setup.samples, setup.tok

  by_path: dict[str, list[int]] = collections.defaultdict(list)
  unresolved: dict[str, list[int]] = collections.defaultdict(list)
  for s in samples:
    (by_path[s['path']] if s['path'] is not None else unresolved[s['name']]).append(s['index'])
  paths = sorted(by_path)
  probes, pool = _start_probes(paths, frames, stab, timeout_s, workers)
  try:
    # Conversations are tokenized here while the workers decode.
    text_len, bad_conv = {}, []
    for s in tqdm.tqdm(samples, desc='conversations', unit='sample', file=sys.stderr,
                       disable=not progress, leave=False):
      n, why = _text_length(s['conversations'], tok, frames)
      if why is not None:
        bad_conv.append({'index': s['index'], 'id': s['id'], 'video': s['name'],
                         'detail': why})
      else:
        text_len[s['index']] = n
    videos: dict[str, dict] = {}
    for r in tqdm.tqdm(probes, total=len(paths), desc='videos', unit='video',
                       file=sys.stderr, disable=not progress):
      videos[r['path']] = r
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  for name in sorted(unresolved):
    videos[os.path.join(video_root, name)] = {
        'path': os.path.join(video_root, name), 'status': 'missing', 'name': name,
        'reason': f'missing: no file for {name!r} (tried the name with '
                  f'{", ".join(qa_lib.VIDEO_EXTENSIONS)}, also with the '
                  f'{qa_lib.ACTIVITYNET_PREFIX!r} prefix)'}
    by_path[os.path.join(video_root, name)] = unresolved[name]

  videos = {p: videos[p] for p in sorted(videos)}   # workers finish in any order
  status_of = {}
  for path, r in videos.items():
    for i in by_path[path]:
      status_of[i] = r['status']
  good = [r for r in videos.values() if r['status'] == 'good']
  problems = [dict(r, entries=by_path[r['path']]) for r in videos.values()
              if r['status'] != 'good']

  lengths, too_long = {}, []
  if tok is not None:
    for s in samples:
      i = s['index']
      if status_of[i] != 'good' or i not in text_len:
        continue
      lengths[i] = text_len[i] + videos[s['path']]['visual_tokens']
      if lengths[i] > max_len:
        too_long.append({'index': i, 'id': s['id'], 'video': s['name'],
                         'length': lengths[i]})
  bad_idx = {b['index'] for b in bad_conv}
  usable = sum(1 for s in samples if status_of[s['index']] == 'good' and
               s['index'] not in bad_idx and lengths.get(s['index'], 0) <= max_len)

  def count(items, key):
    c = collections.Counter(key(x) for x in items)
    return {k: c.get(k, 0) for k in ('good', 'missing', 'unreadable')}

  resolutions = collections.Counter(f'{r["width"]}x{r["height"]}' for r in good)
  result = {
      'annotations': annotations, 'video_root': video_root, 'format': fmt,
      'settings': {'frames': frames, 'max_len': max_len, 'image_size': stab.image_size,
                   'tokenizer': tokenizer if isinstance(tokenizer, (str, os.PathLike)) else
                   (None if tokenizer is None else type(tokenizer).__name__),
                   'timeout_s': timeout_s, 'answers': answers},
      'samples': dict(total=len(samples), **count(samples, lambda s: status_of[s['index']]),
                      bad_conversation=len(bad_conv), too_long=len(too_long), usable=usable),
      'videos': dict(total=len(videos), **count(videos.values(), lambda r: r['status'])),
      'unreadable_reasons': dict(collections.Counter(
          r['reason'].split(':')[0] for r in problems if r['status'] == 'unreadable')),
      'frames': _dist([r['n_frames'] for r in good]),
      'shorter_than_frames': sum(r['n_frames'] < frames for r in good),
      'duration_s': _dist([r['duration_s'] for r in good]),
      'aspect': {k: sum(aspect_bucket(r['width'], r['height']) == k for r in good)
                 for k in ('landscape', 'portrait', 'square')},
      'resolutions': sorted(resolutions.items(), key=lambda kv: (-kv[1], kv[0]))[:10],
      'visual_tokens': _dist([r['visual_tokens'] for r in good]),
      'tokens': _dist(list(lengths.values())) if tok is not None else None,
      'problems': problems,
      'too_long': too_long,
      'bad_conversations': bad_conv,
  }
  if report == '':
    report = annotations + '.check.json'
  result['report'] = report
  if report is not None:
    with open(report, 'w') as f:
      json.dump(result, f, indent=1, default=str)
  return result


def _fmt_dist(d: Mapping | None, unit: str = '') -> str:
  if d is None:
    return 'none'
  return (f'min {d["min"]:g}{unit}, median {d["median"]:g}{unit}, p95 {d["p95"]:g}{unit}, '
          f'max {d["max"]:g}{unit}')


def summary(result: Mapping) -> str:
  """The report as a few human-readable lines."""
  s, v = result['samples'], result['videos']
  lines = [
      f'{result["annotations"]} ({result["format"]} format): {s["total"]} samples, '
      f'{v["total"]} videos',
      f'videos:  good {v["good"]}  missing {v["missing"]}  unreadable {v["unreadable"]}',
      f'samples: good {s["good"]}  missing {s["missing"]}  unreadable {s["unreadable"]}  '
      f'bad_conversation {s["bad_conversation"]}  too_long {s["too_long"]}  '
      f'usable {s["usable"]}',
  ]
  if result['unreadable_reasons']:
    lines.append('unreadable: ' + ', '.join(f'{k} {n}' for k, n in
                                            sorted(result['unreadable_reasons'].items())))
  lines += [
      f'frames per video: {_fmt_dist(result["frames"])}; '
      f'{result["shorter_than_frames"]} shorter than {result["settings"]["frames"]} '
      '(padded with empty frames)',
      f'duration: {_fmt_dist(result["duration_s"], " s")}',
      'aspect: ' + ', '.join(f'{k} {n}' for k, n in result['aspect'].items()) +
      ('; most common sizes ' + ', '.join(f'{k} ({n})' for k, n in result['resolutions'][:5])
       if result['resolutions'] else ''),
      f'visual tokens per video: {_fmt_dist(result["visual_tokens"])}',
  ]
  if result['tokens'] is not None or result['settings']['tokenizer'] is not None:
    lines.append(f'sequence length (text + visual tokens): {_fmt_dist(result["tokens"])}; '
                 f'{s["too_long"]} over max_len={result["settings"]["max_len"]}')
  else:
    lines.append('sequence length: not computed (pass --tokenizer)')
  for p in result['problems'][:10]:
    lines.append(f'  {p["status"]}: {p["path"]}: {p["reason"]}')
  if len(result['problems']) > 10:
    lines.append(f'  ... {len(result["problems"]) - 10} more in the report')
  for b in result['bad_conversations'][:5]:
    lines.append(f'  bad conversation: entry {b["index"]} (id {b["id"]!r}): {b["detail"]}')
  for t in result['too_long'][:5]:
    lines.append(f'  too long: entry {t["index"]} (id {t["id"]!r}): {t["length"]} tokens')
  more = max(len(result['bad_conversations']) - 5, 0) + max(len(result['too_long']) - 5, 0)
  if more:
    lines.append(f'  ... {more} more unusable samples in the report')
  if result['report']:
    lines.append(f'report: {result["report"]}')
  return '\n'.join(lines)


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if len(argv) > 1:
    print(f'unexpected arguments: {argv[1:]}', file=sys.stderr)
    return 2
  from panda_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  try:
    stab = config_lib.stab_config(config_lib.model_config(f.model_size))
    setup = _setup(f.annotations, f.video_root, f.tokenizer, f.frames, f.max_len,
                   f.image_size, stab, f.answers)
  except (AnnotationError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  # From here on an error is a bug (a video's or a conversation's own failures are report
  # lines): it propagates with its traceback.
  result = _scan(setup, report=f.report or '', workers=f.workers,
                 timeout_s=f.timeout_s or None, progress=True)
  print(summary(result))
  return 0


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('annotations', None, 'Training conversation file or VideoQA file (JSON).')
  flags.DEFINE_string('video_root', None, 'Directory the video paths are relative to.')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer directory; enables sequence lengths.')
  flags.DEFINE_string('answers', None, 'Answers file of a questions-only VideoQA file.')
  flags.DEFINE_integer('frames', 8, 'Frames per video (a multiple of 4).')
  flags.DEFINE_integer('max_len', 4096, 'Longest assembled sequence (text + visual tokens).')
  flags.DEFINE_string('model_size', '7b', 'Model size whose visual geometry to use (7b, tiny).')
  flags.DEFINE_integer('image_size', None, "The student's frame size in pixels (default: the "
                       "model size's, 448 for 7b).")
  flags.DEFINE_string('report', None, 'JSON report path (default <annotations>.check.json).')
  flags.DEFINE_integer('workers', 1, 'Processes decoding videos (1: this process).')
  flags.DEFINE_float('timeout_s', 30.0, 'Per-video decoding budget in seconds (0: none).')
  flags.mark_flags_as_required(['annotations', 'video_root'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
