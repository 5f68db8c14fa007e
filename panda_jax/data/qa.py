"""VideoQA evaluation sources: Video-ChatGPT style question files -> evaluation records.

The zero-shot VideoQA sets (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA), as Video-ChatGPT,
Video-LLaVA and the Video-Panda reference (`videopanda/eval/video/run_inference_video_qa.py`)
use them, are JSON lists of `{"video_name", "question", "question_id", "answer"}`; the
reference's copies split them into `test_q.json` (without `answer`) and `test_a.json`
(`{"answer", "question_id", "type"}`), paired by position (`load_qa(q, answers_path=a)`).

`video_name` is normally a file stem: the reference tries `video_root/<name><ext>` for each of
'.mp4', '.avi', '.mov', '.mkv'; its ActivityNet script (`run_inference_video_qa_act.py`)
tries `v_<name><ext>` instead, because ActivityNet-QA names are YouTube ids while the files
carry ActivityNet's "v_" prefix. `resolve_video` tries the exact name (when it already ends
with a video extension), then the stem with every extension of `VIDEO_EXTENSIONS` (the
reference's four, plus '.webm' and '.gif', in which some ActivityNet and TGIF copies are
stored), then the same with "v_" in front, and takes the first regular file found.

Video-ChatGPT's video-based generative performance benchmark (Video-Panda's Table 2) has
three question files over 500 ActivityNet videos: `generic_qa.json` (scored for correctness,
detail orientation and contextual understanding) and `temporal_qa.json`, JSON lists of
`{"video_name", "Q", "A"}`, and `consistency_qa.json`, of `{"video_name", "Q1", "Q2", "A"}`
(two phrasings of one question with one answer). `load_benchmark` reads them and
`benchmark_records` turns them into the same records as `qa_records`, each with the list of
its questions (two for a consistency pair). A video may have several entries, so an entry's
id is `<video_name>_<k>` with k its occurrence count, as the reference's scoring scripts key
them.

`as_conversation` turns a question and its answer into the training conversation format, so
a QA file can also be trained on (`as_training_record`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from panda_jax.data import text
from panda_jax.data.pipeline import VIDEO_EXTENSIONS, AnnotationError, read_json_list

QA_FIELDS = ('video_name', 'question', 'question_id', 'answer')
# Question fields of the fine-grained benchmark's files, by kind, and the fields their answers
# are written to (the reference generation scripts' names).
BENCHMARK_FIELDS = {'generic': ('Q',), 'consistency': ('Q1', 'Q2')}
BENCHMARK_PRED_FIELDS = {'generic': ('pred',), 'consistency': ('pred1', 'pred2')}
FILE_FORMATS = ('videoqa', 'generic', 'consistency')
ACTIVITYNET_PREFIX = 'v_'


def _read_list(path: str, what: str) -> list:
  return read_json_list(path, what, f'{what} entries')


def _check_id(value: Any) -> bool:
  # Question ids are strings in the Video-ChatGPT files; some copies number them instead.
  return (isinstance(value, str) and value != '') or (isinstance(value, int) and
                                                      not isinstance(value, bool))


def load_qa(path: str, answers_path: str | None = None) -> list[dict]:
  """Reads and validates a VideoQA file; returns its entries (dicts) in file order.

  Every entry must have a non-empty string `video_name` and `question`, a `question_id`
  (non-empty string or integer, unique in the file) and a non-empty string `answer`. With
  `answers_path` (the reference's separate `test_a.json`), answers come from that file's entry
  at the same position, whose `question_id`, where present, must match; its `type` (the
  ActivityNet-QA question type) is kept.

  Raises:
    AnnotationError naming the file, the entry index and the field at the first bad entry.
  """
  data = _read_list(path, 'VideoQA')
  answers = None
  if answers_path is not None:
    answers = _read_list(answers_path, 'VideoQA answers')
    if len(answers) != len(data):
      raise AnnotationError(f'{answers_path}: {len(answers)} answers for the {len(data)} '
                            f'questions of {path}; the files are paired by position')
  seen: dict[Any, int] = {}
  out = []
  for i, entry in enumerate(data):
    where = f'{path}: entry {i}'
    if not isinstance(entry, dict):
      raise AnnotationError(f'{where}: expected an object, got {type(entry).__name__}')
    entry = dict(entry)
    for key in ('video_name', 'question'):
      if not isinstance(entry.get(key), str) or not entry[key].strip():
        raise AnnotationError(f'{where}: field "{key}" must be a non-empty string, got '
                              f'{entry.get(key)!r}')
    qid = entry.get('question_id')
    if not _check_id(qid):
      raise AnnotationError(f'{where}: field "question_id" must be a non-empty string or an '
                            f'integer, got {qid!r}')
    if qid in seen:
      raise AnnotationError(f'{where}: field "question_id" {qid!r} repeats entry {seen[qid]}; '
                            'question ids must be unique (results are keyed by them)')
    seen[qid] = i
    if answers is not None:
      a = answers[i]
      a_where = f'{answers_path}: entry {i}'
      if not isinstance(a, dict):
        raise AnnotationError(f'{a_where}: expected an object, got {type(a).__name__}')
      if 'question_id' in a and a['question_id'] != qid:
        raise AnnotationError(f'{a_where}: field "question_id" is {a["question_id"]!r} but '
                              f'question {i} of {path} is {qid!r}; the files must be in the '
                              'same order')
      if 'answer' in entry and entry['answer'] != a.get('answer'):
        raise AnnotationError(f'{where}: field "answer" {entry["answer"]!r} differs from '
                              f'{a.get("answer")!r} in {answers_path}')
      entry['answer'] = a.get('answer')
      if 'type' in a and 'type' not in entry:
        entry['type'] = a['type']
      where = f'{a_where} (answer to {path} entry {i})'
    if 'answer' not in entry and answers is None:
      raise AnnotationError(f'{where}: field "answer" is missing; for a questions-only file '
                            '(test_q.json) pass its answers file (test_a.json) too')
    if not isinstance(entry.get('answer'), str) or not entry['answer'].strip():
      raise AnnotationError(f'{where}: field "answer" must be a non-empty string, got '
                            f'{entry.get("answer")!r}')
    out.append(entry)
  return out


def video_candidates(video_name: str) -> list[str]:
  """Relative file names `resolve_video` tries for `video_name`, in order."""
  names = []
  if os.path.splitext(video_name)[1].lower() in VIDEO_EXTENSIONS:
    names.append(video_name)
  names += [video_name + ext for ext in VIDEO_EXTENSIONS]
  head, tail = os.path.split(video_name)
  if not tail.startswith(ACTIVITYNET_PREFIX):
    names += [os.path.join(head, ACTIVITYNET_PREFIX + tail + ext) for ext in VIDEO_EXTENSIONS]
  return names


def _resolve_relative(video_root: str, video_name: str) -> str | None:
  for name in video_candidates(video_name):
    if os.path.isfile(os.path.join(video_root, name)):
      return name
  return None


def resolve_video(video_root: str, video_name: str) -> str | None:
  """The path (under `video_root`) of the file for `video_name`, or None if there is none."""
  name = _resolve_relative(video_root, video_name)
  return None if name is None else os.path.join(video_root, name)


def qa_records(entries: Sequence[Mapping], video_root: str) -> list[dict]:
  """Evaluation records from `load_qa` entries, with each video found under `video_root`.

  Returns dicts with `question_id`, `video_name`, `video` (path relative to `video_root`, or
  None where no file matches), `question`, `answer` and `type` (None when the file has none).
  Each distinct `video_name` is looked up once.
  """
  found: dict[str, str | None] = {}
  out = []
  for e in entries:
    name = e['video_name']
    if name not in found:
      found[name] = _resolve_relative(video_root, name)
    out.append({'question_id': e['question_id'], 'video_name': name, 'video': found[name],
                'question': e['question'], 'answer': e['answer'], 'type': e.get('type')})
  return out


def as_conversation(record: Mapping) -> list[dict]:
  """The training-format conversation of one question and its answer."""
  return [{'from': 'human', 'value': f'{text.VIDEO_PLACEHOLDER}\n{record["question"]}'},
          {'from': 'gpt', 'value': record['answer']}]


def as_training_record(record: Mapping) -> dict:
  """A `qa_records` record as a training sample (`pipeline.load_annotations` format)."""
  if record.get('video') is None:
    raise ValueError(f'question {record.get("question_id")!r}: no video file was found for '
                     f'{record.get("video_name")!r}; only records with a video can be trained '
                     'on')
  return {'id': str(record['question_id']), 'video': record['video'],
          'conversations': as_conversation(record)}


def detect_format(path: str) -> str:
  """The kind of question file at `path`, by its first entry's fields: 'videoqa'
  (`question`), 'generic' (the benchmark's generic or temporal file: `Q`) or 'consistency'
  (`Q1` and `Q2`)."""
  data = _read_list(path, 'question')
  if not data:
    raise AnnotationError(f'{path}: empty list; expected question entries')
  first = data[0]
  if isinstance(first, dict):
    if 'Q1' in first and 'Q2' in first:
      return 'consistency'
    if 'Q' in first:
      return 'generic'
    if 'question' in first:
      return 'videoqa'
  keys = sorted(first) if isinstance(first, dict) else type(first).__name__
  raise AnnotationError(f'{path}: entry 0 has {keys}; expected a VideoQA entry ("question"), a '
                        'generic/temporal benchmark entry ("Q", "A") or a consistency entry '
                        '("Q1", "Q2", "A")')


def load_benchmark(path: str, kind: str) -> list[dict]:
  """Reads and validates a fine-grained benchmark file: `kind` 'generic' (generic_qa.json,
  temporal_qa.json: `{"video_name", "Q", "A"}`) or 'consistency' (consistency_qa.json:
  `{"video_name", "Q1", "Q2", "A"}`). Returns the entries in file order.

  Raises:
    AnnotationError naming the file, the entry index and the field at the first bad entry.
  """
  if kind not in BENCHMARK_FIELDS:
    raise ValueError(f'kind={kind!r}; expected one of {sorted(BENCHMARK_FIELDS)}')
  data = _read_list(path, f'{kind} benchmark')
  for i, entry in enumerate(data):
    where = f'{path}: entry {i}'
    if not isinstance(entry, dict):
      raise AnnotationError(f'{where}: expected an object, got {type(entry).__name__}')
    for key in ('video_name',) + BENCHMARK_FIELDS[kind] + ('A',):
      if not isinstance(entry.get(key), str) or not entry[key].strip():
        raise AnnotationError(f'{where}: field "{key}" must be a non-empty string, got '
                              f'{entry.get(key)!r} (a {kind} entry has "video_name", '
                              f'{", ".join(repr(k) for k in BENCHMARK_FIELDS[kind])} and "A")')
  return [dict(e) for e in data]


def benchmark_records(entries: Sequence[Mapping], kind: str, video_root: str) -> list[dict]:
  """Evaluation records from `load_benchmark` entries: as `qa_records` (`question_id` is
  `<video_name>_<k>`, `question` the first question, `answer` the file's `A`), plus
  `questions` (the entry's one or two questions), `pred_fields` (where their answers go) and
  `entry` (the file's fields, written back with the answers)."""
  found: dict[str, str | None] = {}
  seen: dict[str, int] = {}
  out = []
  for e in entries:
    name = e['video_name']
    if name not in found:
      found[name] = _resolve_relative(video_root, name)
    k = seen.get(name, -1) + 1
    seen[name] = k
    questions = [e[f] for f in BENCHMARK_FIELDS[kind]]
    out.append({'question_id': f'{name}_{k}', 'video_name': name, 'video': found[name],
                'question': questions[0], 'answer': e['A'], 'type': None,
                'questions': questions, 'pred_fields': list(BENCHMARK_PRED_FIELDS[kind]),
                'entry': dict(e)})
  return out
