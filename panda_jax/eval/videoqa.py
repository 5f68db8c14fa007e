"""Zero-shot VideoQA and fine-grained benchmark inference: a model answers every question of
a benchmark file.

  python -m panda_jax.eval.videoqa --checkpoint=DIR --tokenizer=DIR \\
      --questions=test_q.json [--answers=test_a.json] --video_root=DIR --out=preds.json \\
      [--batch_size=8] [--frames=8] [--max_new_tokens=1024] [--decode_workers=4]

`--checkpoint` is a `panda_jax.convert.checkpoint` output (the released Video-Panda-7B) or a
training workdir (its newest checkpoint and `config.json`). Questions are Video-ChatGPT style
files (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA; see `panda_jax.data.qa` for the formats
and how video names are resolved), or the question files of Video-ChatGPT's video-based
generative performance benchmark (`generic_qa.json`, `temporal_qa.json`,
`consistency_qa.json`), told apart by their fields (`--format`).

Decoding follows the reference's `run_inference_video_qa.py`: the `v1` template with one
`<image>` per frame before the question, greedy decoding up to 1024 new tokens, stopping at
`</s>`. Output, as the reference writes it (so its GPT-judge scripts read it unchanged): one JSON
object per line, `{"id", "question", "answer", "pred"}` (plus `"type"` where the answers file
has one). A benchmark file's lines are its entries with `"id"` (`<video_name>_<k>`) and the
answers added as its generation scripts add them: `"pred"` for generic and temporal entries,
`"pred1"` and `"pred2"` (the answers to `"Q1"` and `"Q2"`) for consistency pairs. Lines are
appended as batches finish, so an interrupted run resumes with the same command: entries whose
id is already in the file are not asked again. Entries whose video is missing or cannot be
decoded get no line; they are counted, logged and listed with the reason in
`<out>.failures.json`.

Several processes (`--multihost`; on one machine `LOCAL_MODULE=panda_jax.eval.videoqa
launch/local.sh N K ...`) share the work by video: process i of N answers the questions of
every N-th video of the file (from the i-th) into `<out>.part<i>-of-<N>` (resumable the same
way; failures in `<out>.failures.<i>-of-<N>.json`) and then writes `<out>.done.<i>-of-<N>.json`;
whichever process finds every share done (the last to finish) writes `<out>` (every answered
entry once, in the file's order) and `<out>.failures.json`. Each process computes on its own
devices. One process or several, a finished run writes `<out>.complete.json` (the counts);
a run starting removes it.

Each video is decoded once (its questions share the frames), by `--decode_workers` background
threads that run ahead of the model (a bounded number of videos), so the accelerator does not
wait for the host's decoding; lines keep the file's video order. Batches have a fixed size
(the last one is filled with copies that are not written), so one compiled program serves the
run.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import io
import os
import sys
import time
from typing import Mapping, Sequence

import numpy as np

from panda_jax import storage
from panda_jax.data import qa as qa_lib
from panda_jax.data.video import VideoDecodeError, load_video


def load_model(checkpoint: str):
  """-> (PandaConfig, variables) from a converted checkpoint or a training workdir."""
  from panda_jax.convert import checkpoint as conv
  path = storage.path(checkpoint)
  if storage.exists(path / conv.CONFIG_FILE):
    model, cfg, variables = conv.load_converted(path)
    if model != 'video_panda':
      raise ValueError(f'{checkpoint} holds a converted {model!r} model; VideoQA needs a whole '
                       'Video-Panda (convert with --model=video_panda)')
    return cfg, variables
  if storage.exists(path / 'config.json') and storage.exists(path / 'checkpoints'):
    import ml_collections
    from panda_jax import config as config_lib
    from panda_jax import workdir as workdir_lib
    config = ml_collections.ConfigDict(storage.read_json(path / 'config.json'))
    cfg = config_lib.panda_config(config.model)
    step, params, batch_stats = workdir_lib.restore_variables(path)
    logging.info('loaded %s at step %d', path, step)
    return cfg, {'params': params, 'batch_stats': batch_stats}
  raise FileNotFoundError(f'{checkpoint}: neither a converted checkpoint ({conv.CONFIG_FILE}) '
                          'nor a training workdir (config.json + checkpoints/)')


def load_clip(path: str, stab, frames: int = 8, timeout_s: float = 60.0) -> dict:
  """One video as the model with visual tokenizer config `stab` takes it: `pixels`
  [frames, S, S, 3] and `mask` [frames, S, S] (see `data.video.load_video`; raises
  VideoDecodeError)."""
  return load_video(path, num=frames, size=stab.image_size, teacher_size=stab.image_size // 2,
                    patch=stab.patch_size, timeout_s=timeout_s)


def _done_ids(out: str) -> set:
  """Question ids already answered in `out` (a torn last line from a kill is dropped)."""
  if not storage.exists(out):
    return set()
  rows = _read_ids(out)
  storage.write_text(out, ''.join(rows.values()))    # rewrite without a partial line
  return set(rows)


def _row(r: Mapping, preds: Sequence[str]) -> dict:
  """The output line of record `r` given the answers to its questions."""
  if 'entry' in r:          # a benchmark record: the file's own fields, then the answers
    row = {'id': r['question_id']}
    row.update(r['entry'])
    row.update(zip(r['pred_fields'], preds))
    return row
  row = {'id': r['question_id'], 'question': r['question'], 'answer': r['answer'],
         'pred': preds[0]}
  if r.get('type') is not None:
    row['type'] = r['type']
  return row


def _decode_videos(groups: Sequence, load, workers: int):
  """Yields (group, clip, reason) for each `groups` item, in order, where `load(group)` returns
  (clip, reason). With `workers` > 0, `load` runs in that many background threads, at most
  2 * workers videos ahead of the consumer (bounded memory); with 0, inline."""
  if workers <= 0:
    for g in groups:
      yield (g,) + load(g)
    return
  with cf.ThreadPoolExecutor(workers, thread_name_prefix='decode') as pool:
    ahead = collections.deque()
    it = iter(groups)
    try:
      for g in itertools.islice(it, 2 * workers):
        ahead.append((g, pool.submit(load, g)))
      while ahead:
        g, fut = ahead.popleft()
        for nxt in itertools.islice(it, 1):
          ahead.append((nxt, pool.submit(load, nxt)))
        yield (g,) + fut.result()
    finally:
      for _, fut in ahead:      # stopped early (an error, a kill): drop what is queued
        fut.cancel()


def _read_ids(path: str) -> dict:
  """{id: line} of the whole lines of a JSON-lines file (none if it is absent); read only."""
  rows = {}
  if storage.exists(path):
    for line in storage.read_text(path).splitlines(keepends=True):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      rows[row['id']] = line if line.endswith('\n') else line + '\n'
  return rows


def _write_atomic(path: str, write) -> None:
  buf = io.StringIO()
  write(buf)
  storage.write_text(path, buf.getvalue())


def _video_key(r: Mapping) -> str:
  return r['video'] or f'<missing>{r["video_name"]}'


def answer_file(predictor, records: Sequence[Mapping], video_root: str, out: str,
                batch_size: int = 8, frames: int = 8, timeout_s: float = 60.0,
                progress: bool = True, workers: int = 2,
                process: tuple[int, int] | None = None) -> dict:
  """Answers `records` (from `qa.qa_records` or `qa.benchmark_records`) into `out` (JSON
  lines); returns counts: `questions` (records), `answered` (this call), `already` (found in
  `out`), `failed` (no usable video), and `complete` (every process's share is done and
  `out` holds them all).

  `process`: (index, count) of this process among those sharing the file (default: JAX's).
  With several, this process answers its share of the videos (every count-th, from the
  index-th) into `<out>.part<index>-of-<count>` and the counts are its share's; the last to
  finish its share merges them into `out` (see the module docstring).

  Videos are decoded by `workers` background threads (0: inline) while the model answers the
  questions of the videos before them; lines are written in the order of `records`' videos
  either way. A record with two questions (a consistency pair) gets its line once both are
  answered.
  """
  index, count = _check_run(batch_size, workers, frames, process)
  complete_path = out + '.complete.json'
  storage.remove(complete_path)
  share = _Share.of(records, out, index, count)
  todo = [r for r in share.records if r['question_id'] not in share.done]
  load = functools.partial(_load_group, video_root=video_root, stab=predictor.cfg.stab,
                           frames=frames, timeout_s=timeout_s)
  t0 = time.perf_counter()
  answered, failures = _answer(predictor, todo, load, share.write_to, batch_size, workers,
                               progress)
  stats = {'questions': len(share.records), 'already': len(share.records) - len(todo),
           'answered': answered, 'failed': len(failures)}
  storage.write_json(share.failures_path, failures, indent=1)
  dt = time.perf_counter() - t0
  logging.info('answered %d questions in %.1fs (%.2f/s); %d failed', answered, dt,
               answered / max(dt, 1e-9), len(failures))
  summary = share.finish(records, out, failures)
  stats['complete'] = summary is not None
  if summary is not None:
    _write_atomic(complete_path, lambda f: json.dump(summary, f, indent=1))
  return stats


def _check_run(batch_size: int, workers: int, frames: int,
               process: tuple[int, int] | None) -> tuple[int, int]:
  """Refuses bad `answer_file` arguments; returns (index, count) of this process."""
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be positive')
  if workers < 0:
    raise ValueError(f'workers={workers} must be 0 (decode inline) or more')
  if frames < 4 or frames % 4:
    raise ValueError(f'frames={frames} must be a positive multiple of 4 (4, 8, 16, 32)')
  if process is None:
    import jax
    process = (jax.process_index(), jax.process_count())
  index, count = process
  if not 0 <= index < count:
    raise ValueError(f'process index {index} of {count} processes')
  return index, count


@dataclasses.dataclass(frozen=True)
class _Share:
  """What one of `count` processes answers of a question file, and where it writes."""
  records: list          # its records: all of them for one process, else its videos'
  write_to: str          # its answers (JSON lines): `out` itself for one process
  failures_path: str
  done_path: str | None  # its done marker (None for one process)
  done: set              # question ids already answered (in `write_to`, or merged in `out`)
  count: int

  @classmethod
  def of(cls, records: Sequence[Mapping], out: str, index: int, count: int) -> _Share:
    """Process `index`'s share; its done marker, if any, is removed (not done until marked
    again), and a torn last line of its answers is dropped."""
    if count == 1:
      return cls(list(records), out, out + '.failures.json', None, _done_ids(out), 1)
    shares = {v: i % count for i, v in enumerate(dict.fromkeys(_video_key(r) for r in records))}
    write_to = f'{out}.part{index}-of-{count}'
    done_path = f'{out}.done.{index}-of-{count}.json'
    storage.remove(done_path)
    return cls([r for r in records if shares[_video_key(r)] == index], write_to,
               f'{out}.failures.{index}-of-{count}.json', done_path,
               _done_ids(write_to) | set(_read_ids(out)), count)

  def finish(self, all_records: Sequence[Mapping], out: str, failures: list) -> dict | None:
    """Marks this share done; returns the whole file's counts when every share is (merging
    them into `out` for several processes), else None."""
    if self.count == 1:
      return {'questions': len(self.records), 'answered': len(_read_ids(out)),
              'failed': len(failures), 'processes': 1}
    _write_atomic(self.done_path, lambda f: json.dump(
        {'questions': len(self.records), 'of': len(all_records)}, f))
    return _merge_shares(all_records, out, self.count)


def _load_group(item, video_root: str, stab, frames: int, timeout_s: float):
  """(clip, None) for a (video, records) group, or (None, reason) when it has no usable
  video; clip: `pixels`, `mask` (`load_clip`)."""
  video, rs = item
  if rs[0]['video'] is None:
    return None, f'no file for video_name {rs[0]["video_name"]!r} under {video_root}'
  try:
    v = load_clip(os.path.join(video_root, video), stab, frames, timeout_s)
  except VideoDecodeError as e:     # any failure of the file (anything else is a bug)
    return None, e.reason
  return {'pixels': v['pixels'], 'mask': v['mask']}, None


class _Batches:
  """Questions waiting for the model -> fixed-size batches -> whole lines of `f_out`.

  A record's line is written once all its questions (two for a consistency pair) are answered.
  """

  def __init__(self, predictor, batch_size: int, f_out, bar):
    self.predictor, self.batch_size, self.f_out, self.bar = predictor, batch_size, f_out, bar
    self.pending: list = []     # (record, question index, pixels, mask)
    self.partial: dict = {}     # question_id -> answers so far, for records of two questions
    self.finished = 0           # records whose line is written

  def add(self, rs: Sequence[Mapping], clip: Mapping) -> None:
    """Queues every question of the records `rs` of one video; answers the full batches."""
    self.pending.extend((r, i, clip['pixels'], clip['mask']) for r in rs
                        for i in range(len(_questions(r))))
    self.flush()

  def flush(self, final: bool = False) -> None:
    """Answers the full batches (with `final`, the rest too, filled with copies)."""
    while len(self.pending) >= self.batch_size or (final and self.pending):
      chunk = self.pending[:self.batch_size]
      del self.pending[:self.batch_size]
      n = len(chunk)
      chunk = chunk + [chunk[-1]] * (self.batch_size - n)      # fixed shape: fill with copies
      answers = self.predictor.answer(np.stack([c[2] for c in chunk]),
                                      np.stack([c[3] for c in chunk]),
                                      [_questions(c[0])[c[1]] for c in chunk])
      for (r, i, _, _), pred in zip(chunk[:n], answers[:n]):
        self._answered(r, i, pred)

  def _answered(self, r: Mapping, i: int, pred: str) -> None:
    preds = self.partial.setdefault(r['question_id'], [None] * len(_questions(r)))
    preds[i] = pred
    if all(p is not None for p in preds):
      del self.partial[r['question_id']]
      self.f_out.append(json.dumps(_row(r, preds)))
      self.finished += 1
      self.bar.update(1)


def _answer(predictor, todo: Sequence[Mapping], load, write_to: str, batch_size: int,
            workers: int, progress: bool) -> tuple[int, list]:
  """Answers the records `todo`, video by video, appending their lines to `write_to`;
  returns (records answered, failures: one {id, video_name, reason} per record without a
  usable video)."""
  from tqdm import tqdm
  by_video: dict = {}
  for r in todo:
    by_video.setdefault(_video_key(r), []).append(r)
  failures = []
  bar = tqdm(total=len(todo), desc='questions', unit='q', disable=not progress, file=sys.stderr)
  decoded = contextlib.closing(_decode_videos(list(by_video.items()), load, workers))
  with storage.LineLog(write_to) as f_out, decoded as videos:
    batches = _Batches(predictor, batch_size, f_out, bar)
    for (_, rs), clip, reason in videos:
      if reason is None:
        batches.add(rs, clip)
        continue
      logging.warning('%d question(s) skipped: %s', len(rs), reason)
      failures += [{'id': r['question_id'], 'video_name': r['video_name'], 'reason': reason}
                   for r in rs]
      bar.update(len(rs))
    batches.flush(final=True)
  bar.close()
  return batches.finished, failures


def _merge_shares(records: Sequence[Mapping], out: str, count: int) -> dict | None:
  """When every one of the `count` processes' shares of `records` is done: writes `out` (every
  answered entry once, in the order of `records`, with any lines `out` already held) and
  `<out>.failures.json` from the shares, and returns the counts; else None. A share's marker
  counts only for the same file (its question count); a missing one is a share not done yet,
  one that does not parse an error (markers are written atomically)."""
  marks = []
  for i in range(count):
    try:
      marks.append(storage.read_json(f'{out}.done.{i}-of-{count}.json'))
    except FileNotFoundError:
      return None
  if any(m.get('of') != len(records) for m in marks) or \
      sum(m['questions'] for m in marks) != len(records):
    return None
  rows = _read_ids(out)
  for i in range(count):
    rows.update(_read_ids(f'{out}.part{i}-of-{count}'))
  failures = []
  for i in range(count):
    failures += storage.read_json(f'{out}.failures.{i}-of-{count}.json')
  failures = [x for x in failures if x['id'] not in rows]
  order = [r['question_id'] for r in records]
  _write_atomic(out, lambda f: f.writelines(rows[q] for q in order if q in rows))
  _write_atomic(out + '.failures.json', lambda f: json.dump(failures, f, indent=1))
  return {'questions': len(records), 'answered': sum(q in rows for q in order),
          'failed': len(failures), 'processes': count}


def _questions(r: Mapping) -> list[str]:
  return r.get('questions') or [r['question']]


def load_records(questions: str, answers: str | None, video_root: str,
                 file_format: str = 'auto') -> tuple[str, list[dict]]:
  """(format, records) of a question file: a VideoQA file ('videoqa', with `answers` for a
  questions-only file) or one of the fine-grained benchmark's ('generic' for generic_qa.json
  and temporal_qa.json, 'consistency'); 'auto' tells them apart by their fields."""
  if file_format not in ('auto',) + qa_lib.FILE_FORMATS:
    raise ValueError(f'format={file_format!r}; expected auto or one of {qa_lib.FILE_FORMATS}')
  if file_format == 'auto':
    file_format = qa_lib.detect_format(questions)
  if file_format == 'videoqa':
    return file_format, qa_lib.qa_records(qa_lib.load_qa(questions, answers_path=answers),
                                          video_root)
  if answers:
    raise ValueError(f'--answers={answers} is for VideoQA question files; a {file_format} '
                     'benchmark file holds its answers ("A")')
  return file_format, qa_lib.benchmark_records(qa_lib.load_benchmark(questions, file_format),
                                               file_format, video_root)


def main(argv):
  from absl import app, flags
  from panda_jax.eval.generate import Sampling
  from panda_jax.eval.predict import Predictor, load_text
  from panda_jax import distributed
  del argv
  f = flags.FLAGS
  distributed.from_flags()
  for name in ('checkpoint', 'tokenizer', 'questions', 'video_root', 'out'):
    if not getattr(f, name):
      raise app.UsageError(f'--{name} is required')
  try:
    kind, records = load_records(f.questions, f.answers or None, f.video_root, f.format)
  except (qa_lib.AnnotationError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('%s: %d %s entries', f.questions, len(records), kind)
  cfg, variables = load_model(f.checkpoint)
  try:
    tok, template = load_text(f.tokenizer, f.template, f.system_message, f.checkpoint)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('conversation template %s', template.name)
  predictor = Predictor(cfg, variables, tok, Sampling(max_new_tokens=f.max_new_tokens,
                                                      eos_id=template.stop_id(tok)),
                        template=template)
  stats = answer_file(predictor, records, f.video_root, f.out, f.batch_size, f.frames,
                      f.timeout_s, workers=f.decode_workers)
  what = 'question pairs' if kind == 'consistency' else 'questions'
  import jax
  index, count = jax.process_index(), jax.process_count()
  share = f'process {index} of {count}: ' if count > 1 else ''
  print(f'{f.out}: {share}{stats["questions"]} {what}, {stats["answered"]} answered now, '
        f'{stats["already"]} already there, {stats["failed"]} without a usable video '
        f'(listed in {f.out}.failures.json)'
        + ('' if count == 1 else '; complete' if stats['complete'] else
           '; other processes\' shares not done yet'))


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('checkpoint', None, 'Converted checkpoint or training workdir.')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer directory (e.g. vicuna-7b-v1.5).')
  flags.DEFINE_string('questions', None, 'Question file: VideoQA (test_q.json or combined) or '
                      'a fine-grained benchmark file (generic_qa.json, temporal_qa.json, '
                      'consistency_qa.json).')
  flags.DEFINE_string('answers', '', 'Separate answers file (test_a.json), paired by position.')
  flags.DEFINE_enum('format', 'auto', ['auto', *qa_lib.FILE_FORMATS],
                    'Question file format; auto: by the first entry\'s fields.')
  flags.DEFINE_string('video_root', None, 'Directory holding the videos.')
  flags.DEFINE_string('out', None, 'Predictions (JSON lines, appended; resumable).')
  flags.DEFINE_integer('batch_size', 8, 'Questions per generation batch.')
  flags.DEFINE_integer('frames', 8, 'Frames per video (a multiple of 4).')
  flags.DEFINE_integer('max_new_tokens', 1024, 'Answer length limit (the reference: 1024).')
  flags.DEFINE_string('template', '', 'Conversation template: videopanda_v1, vicuna_v1 or '
                      'chatml; default: a training workdir\'s data.system_prompt, else chatml '
                      'for a tokenizer with a ChatML chat template, else videopanda_v1.')
  flags.DEFINE_string('system_message', None, 'Replaces the template\'s system message.')
  flags.DEFINE_float('timeout_s', 60.0, 'Per-video decoding time budget.')
  flags.DEFINE_integer('decode_workers', 4, 'Background video-decoding threads (0: inline).')
  from panda_jax import distributed
  distributed.define_flags()
  app.run(main)
