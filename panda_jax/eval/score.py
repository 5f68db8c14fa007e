"""Scores VideoQA and fine-grained benchmark predictions: judge-free metrics always,
optionally an LLM judge.

  python -m panda_jax.eval.score --predictions=preds.jsonl --out=scores.json \\
      [--protocol=qa|correctness|detail|context|temporal|consistency] \\
      [--judge=none|openai] [--base_url=http://127.0.0.1:8000/v1] [--model=gpt-3.5-turbo] \\
      [--workers=8] [--retry_unparsed]

Predictions are the JSON lines `panda_jax.eval.videoqa` writes: `{"id", "question", "answer",
"pred"}` plus an optional `"type"`.

Judge-free (always): normalised exact match and SQuAD-style token F1, overall and by `type`, and
a per-type majority-answer baseline (how often always giving the type's most frequent answer
would be exactly right). See `normalize_answer` for the normalisation.

`--judge=openai` follows Video-ChatGPT's QA protocol (`quantitative_evaluation/
evaluate_activitynet_qa.py`, the one Video-Panda reports): its system and user prompts, a verdict
dict `{'pred': 'yes'|'no', 'score': 0..5}`, accuracy = yes / judged, score = mean over judged.
Requests go through the `openai` client to `--base_url`, so any OpenAI-compatible server can be
the judge; the key comes from OPENAI_API_KEY (a local server takes any key, so it may be unset
when `--base_url` is given). Temperature 0.

Every verdict, parsed or not, is appended to `<out stem>.verdicts.jsonl` as soon as it arrives,
keyed by question id, judge model and prompt version (and a digest of the judged text, so an
edited prediction is judged again). A rerun asks only for what that file lacks
(`--retry_unparsed`: also the unparsed ones), so a killed run loses at most the requests in
flight. Rate limits (429), server errors (5xx), timeouts and connection errors are retried with
exponential backoff; a request that still fails, or fails otherwise (bad key, unknown model),
stops the run with a message, keeping every verdict so far.

`--protocol` other than `qa` scores Video-ChatGPT's video-based generative performance
benchmark (Video-Panda's Table 2) with its five judge prompts (`quantitative_evaluation/
evaluate_benchmark_*.py`): correctness of information, detail orientation and contextual
understanding over the answers to `generic_qa.json`, temporal understanding over
`temporal_qa.json`, consistency over the pairs of `consistency_qa.json` (the judge sees both
questions and both answers). Each verdict is `{'score': 0..5}`; the protocol's figure is the
mean over the judged entries (`judge.score`). Predictions are `panda_jax.eval.videoqa`'s
benchmark lines or the reference generation scripts' JSON list. Judge-free: token F1 of the
answers against the reference answer (and between the two answers of a pair).
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import string
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from panda_jax import storage

# ---------------------------------------------------------------------------------------------
# Judge-free metrics.

UNTYPED = '(untyped)'    # group of records without a `type` (see `majority_baseline`)

_ARTICLES = {'a', 'an', 'the'}
_UNITS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten',
          'eleven', 'twelve', 'thirteen', 'fourteen', 'fifteen', 'sixteen', 'seventeen',
          'eighteen', 'nineteen']
_TENS = {'twenty': 20, 'thirty': 30, 'forty': 40, 'fifty': 50, 'sixty': 60, 'seventy': 70,
         'eighty': 80, 'ninety': 90}
_NUMBERS = dict({w: i for i, w in enumerate(_UNITS)}, **_TENS, hundred=100)
_DECIMAL = re.compile(r'(?<=\d)\.(?=\d)')
_PUNCT = re.compile('[' + re.escape(string.punctuation) + ']')


def _numbers_to_digits(tokens: list[str]) -> list[str]:
  """Number words -> digits: 'two' -> '2', 'twenty one' -> '21' (up to 'hundred')."""
  out = []
  i = 0
  while i < len(tokens):
    t = tokens[i]
    if t in _TENS and i + 1 < len(tokens) and 1 <= _NUMBERS.get(tokens[i + 1], 0) <= 9:
      out.append(str(_TENS[t] + _NUMBERS[tokens[i + 1]]))
      i += 2
      continue
    out.append(str(_NUMBERS[t]) if t in _NUMBERS else t)
    i += 1
  return out


def normalize_answer(s: str) -> str:
  """The comparable form of an answer: lower case, hyphens split words, other punctuation
  removed (a decimal point between digits stays), articles a/an/the dropped, number words as
  digits ('Two dogs.' -> '2 dogs', 'twenty-one' -> '21'), whitespace collapsed."""
  if not isinstance(s, str):
    raise TypeError(f'answer must be a string, got {type(s).__name__}: {s!r}')
  s = _DECIMAL.sub('\0', s.lower().replace('-', ' '))
  s = _PUNCT.sub('', s).replace('\0', '.')
  tokens = [t for t in s.split() if t not in _ARTICLES]
  return ' '.join(_numbers_to_digits(tokens))


def exact_match(pred: str, truth: str) -> float:
  """1.0 when the normalised answers are equal, else 0.0."""
  return float(normalize_answer(pred) == normalize_answer(truth))


def token_f1(pred: str, truth: str) -> float:
  """SQuAD-style F1 over normalised tokens (two empty answers match: 1.0)."""
  p, t = normalize_answer(pred).split(), normalize_answer(truth).split()
  if not p or not t:
    return float(p == t)
  same = sum((collections.Counter(p) & collections.Counter(t)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(t)
  return 2 * precision * recall / (precision + recall)


def _type_of(r: Mapping) -> str:
  t = r.get('type')
  return UNTYPED if t is None else str(t)


def _metrics(records: Sequence[Mapping]) -> dict:
  n = len(records)
  if not n:
    return {'count': 0, 'exact_match': None, 'token_f1': None}
  return {'count': n,
          'exact_match': sum(exact_match(r['pred'], r['answer']) for r in records) / n,
          'token_f1': sum(token_f1(r['pred'], r['answer']) for r in records) / n}


def _by_type(records: Sequence[Mapping]) -> dict:
  groups: dict = {}
  for r in records:
    groups.setdefault(_type_of(r), []).append(r)
  return dict(sorted(groups.items()))


def score_records(records: Sequence[Mapping]) -> dict:
  """Judge-free metrics of prediction records (each with `pred` and `answer`, optionally `type`):
  `count`, `exact_match`, `token_f1` (means; None when there are no records) and `by_type`
  ({type: the same three}; empty when no record has a type, records without one are grouped
  under UNTYPED when others have one)."""
  out = _metrics(records)
  typed = any(r.get('type') is not None for r in records)
  out['by_type'] = {t: _metrics(rs) for t, rs in _by_type(records).items()} if typed else {}
  return out


def majority_baseline(records: Sequence[Mapping]) -> dict:
  """{type: {answer, accuracy, count}}: the accuracy (normalised exact match) of always giving
  the type's most frequent normalised answer. Ties go to the alphabetically first answer, so
  the result does not depend on record order. Records without a `type` form the group UNTYPED
  (the only group when no record has a type)."""
  out = {}
  for t, rs in _by_type(records).items():
    counts = collections.Counter(normalize_answer(r['answer']) for r in rs)
    answer, hits = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out[t] = {'answer': answer, 'accuracy': hits / len(rs), 'count': len(rs)}
  return out


def _json_rows(path: str) -> list[tuple[str, Any]]:
  """(where, value) for each prediction of a JSON-lines file, or of a JSON list (what the
  reference's benchmark generation scripts write). In a JSON-lines file a torn last line (a
  killed writer) is skipped with a warning; any other malformed line is an error naming it."""
  content = storage.read_text(path)
  if content.lstrip().startswith('['):
    try:
      data = json.loads(content)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not a JSON list ({e}); expected a JSON list of predictions '
                       'or one prediction per line') from None
    if isinstance(data, list):
      return [(f'entry {i}', r) for i, r in enumerate(data)]
  lines = content.splitlines(keepends=True)
  rows = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append((f'line {i}', json.loads(line)))
    except json.JSONDecodeError as e:
      if i == len(lines) and not line.endswith('\n'):
        logging.warning('%s:%d: skipping a torn last line', path, i)
        continue
      raise ValueError(f'{path}:{i}: not a JSON object ({e}); expected one prediction per line '
                       '{"id", "question", "answer", "pred"}') from None
  return rows


def _check_rows(path: str, rows, need: Sequence[str], hint: str) -> None:
  """Every row a dict with string fields `need` and a unique string or integer `id`."""
  seen = {}
  for where, r in rows:
    at = f'{path}:{where[5:]}' if where.startswith('line ') else f'{path}: {where}'
    missing = [k for k in ('id',) + tuple(need) if not isinstance(r, dict) or k not in r]
    if missing:
      raise ValueError(f'{at}: missing {missing}; {hint}: {json.dumps(r)[:200]}')
    for k in need:
      if not isinstance(r[k], str):
        raise ValueError(f'{at}: "{k}" must be a string, got {r[k]!r}')
    if not isinstance(r['id'], (str, int)) or isinstance(r['id'], bool):
      raise ValueError(f'{at}: "id" must be a string or an integer, got {r["id"]!r}')
    if r['id'] in seen:
      raise ValueError(f'{at}: id {r["id"]!r} already on {seen[r["id"]]}')
    seen[r['id']] = where


def read_predictions(path: str) -> list[dict]:
  """VideoQA prediction records (`{"id", "question", "answer", "pred"}`, as
  `panda_jax.eval.videoqa` writes them) from a JSON-lines file (or a JSON list). A torn last
  line (a killed writer) is skipped with a warning; any other malformed line, a record missing
  a field or a repeated id is an error naming the line."""
  rows = _json_rows(path)
  _check_rows(path, rows, ('question', 'answer', 'pred'),
              'a prediction needs "id", "question", "answer" and "pred" (as '
              'panda_jax.eval.videoqa writes them)')
  return [r for _, r in rows]


# The fine-grained benchmark's prediction fields (the reference generation scripts' names) ->
# the names the protocols' prompts use.
BENCHMARK_FIELDS = {
    'generic': {'Q': 'question', 'A': 'answer', 'pred': 'pred'},
    'consistency': {'Q1': 'question', 'Q2': 'question2', 'A': 'answer', 'pred1': 'pred',
                    'pred2': 'pred2'},
}


def read_benchmark_predictions(path: str, kind: str) -> list[dict]:
  """Fine-grained benchmark predictions -> records for its judge protocols.

  `kind` 'generic' (answers to generic_qa.json or temporal_qa.json: `{"video_name", "Q", "A",
  "pred"}`) or 'consistency' (`{"video_name", "Q1", "Q2", "A", "pred1", "pred2"}`), as JSON
  lines (`panda_jax.eval.videoqa`, with an `"id"`) or a JSON list (the reference's generation
  scripts). Without an `"id"`, an entry is `<video_name>_<k>` with k its video's occurrence
  count, as the reference's scoring keys it. Returns `{"id", "video_name", "question",
  "answer", "pred"}` (plus `"question2"`, `"pred2"` for consistency pairs).
  """
  if kind not in BENCHMARK_FIELDS:
    raise ValueError(f'kind={kind!r}; expected one of {sorted(BENCHMARK_FIELDS)}')
  names = BENCHMARK_FIELDS[kind]
  rows, seen = [], {}
  for where, r in _json_rows(path):
    if isinstance(r, dict) and 'id' not in r and isinstance(r.get('video_name'), str):
      k = seen[r['video_name']] = seen.get(r['video_name'], -1) + 1
      r = dict(r, id=f'{r["video_name"]}_{k}')
    rows.append((where, r))
  other = 'consistency' if kind == 'generic' else 'generic'
  _check_rows(path, rows, tuple(names),
              f'a {kind} benchmark prediction needs {", ".join(repr(k) for k in names)} (and '
              f'"id" or "video_name"); is this a {other} file (--protocol='
              f'{"consistency" if other == "consistency" else "correctness|detail|context|temporal"})?')
  return [dict({'id': r['id'], 'video_name': r.get('video_name')},
               **{ours: r[theirs] for theirs, ours in names.items()}) for _, r in rows]


def score_benchmark(records: Sequence[Mapping]) -> dict:
  """Judge-free figures of benchmark records: `count`, `token_f1` (mean token F1 of each answer
  against `answer`; both answers of a consistency pair count) and, for pairs,
  `pair_token_f1` (mean token F1 between the two answers of a pair)."""
  if not records:
    return {'count': 0, 'token_f1': None}
  preds = [(r['pred'], r['answer']) for r in records]
  pairs = 'pred2' in records[0]
  if pairs:
    preds += [(r['pred2'], r['answer']) for r in records]
  out = {'count': len(records), 'token_f1': sum(token_f1(p, a) for p, a in preds) / len(preds)}
  if pairs:
    out['pair_token_f1'] = sum(token_f1(r['pred'], r['pred2']) for r in records) / len(records)
  return out


# ---------------------------------------------------------------------------------------------
# The Video-ChatGPT judge.

# Video-ChatGPT quantitative_evaluation/evaluate_activitynet_qa.py, text unchanged (including
# its missing spaces and the non-integer example score). Change PROMPT_VERSION with the text.
PROMPT_VERSION = 'video-chatgpt-qa-v1'
SYSTEM_PROMPT = (
    'You are an intelligent chatbot designed for evaluating the correctness of generative '
    'outputs for question-answer pairs. '
    'Your task is to compare the predicted answer with the correct answer and determine if they '
    "match meaningfully. Here's how you can accomplish the task:"
    '------'
    '##INSTRUCTIONS: '
    '- Focus on the meaningful match between the predicted answer and the correct answer.\n'
    '- Consider synonyms or paraphrases as valid matches.\n'
    '- Evaluate the correctness of the prediction compared to the answer.')
USER_PROMPT = (
    'Please evaluate the following video-based question-answer pair:\n\n'
    'Question: {question}\n'
    'Correct Answer: {answer}\n'
    'Predicted Answer: {pred}\n\n'
    'Provide your evaluation only as a yes/no and score where the score is an integer value '
    'between 0 and 5, with 5 indicating the highest meaningful match. '
    "Please generate the response in the form of a Python dictionary string with keys 'pred' "
    "and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in "
    'INTEGER, not STRING.'
    'DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary '
    'string. '
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}.")


def judge_messages(question: str, answer: str, pred: str) -> list[dict]:
  """The chat messages asking the QA judge about one prediction."""
  return QA.messages({'question': question, 'answer': answer, 'pred': pred})


_FENCE = re.compile(r'^```[a-zA-Z]*\s*(.*?)\s*```$', re.S)


def _reply_dict(text: str | None) -> dict | None:
  """A judge reply as a dict: a Python dict literal or JSON, optionally inside a Markdown
  code fence; None for anything else."""
  if not isinstance(text, str) or len(text) > 10_000:
    return None
  text = text.strip()
  m = _FENCE.match(text)
  if m:
    text = m.group(1)
  for load in (ast.literal_eval, json.loads):
    try:
      value = load(text)
      break
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue
  else:
    return None
  return value if isinstance(value, dict) else None


def _score_0_5(score) -> int | None:
  """A verdict's score as the reference reads it (`int()`, so 4.8 -> 4), or None unless it is
  a number (or numeric string) in [0, 5]."""
  if isinstance(score, bool):
    return None
  if isinstance(score, str):
    try:
      score = float(score.strip())
    except ValueError:
      return None
  if not isinstance(score, (int, float)) or not 0 <= score <= 5:
    return None
  return int(score)


def parse_verdict(text: str | None) -> dict | None:
  """A QA judge reply -> {'pred': 'yes'|'no', 'score': int 0..5}, or None when it is not one.

  Accepts a Python dict literal (`{'pred': 'yes', 'score': 4}`, what the prompt asks for) or
  JSON, optionally inside a Markdown code fence. `pred` must be yes/no (any case); `score` a
  number (or numeric string) in [0, 5], truncated to an integer as the reference's `int()`
  does. Anything else (prose, a dict without those keys) is None.
  """
  value = _reply_dict(text)
  if value is None:
    return None
  pred, score = value.get('pred'), _score_0_5(value.get('score'))
  if not isinstance(pred, str) or pred.strip().lower() not in ('yes', 'no') or score is None:
    return None
  return {'pred': pred.strip().lower(), 'score': score}


def parse_score(text: str | None) -> dict | None:
  """A fine-grained benchmark judge reply -> {'score': int 0..5}, or None when it is not one
  (the same forms as `parse_verdict`, with only `score`)."""
  value = _reply_dict(text)
  score = None if value is None else _score_0_5(value.get('score'))
  return None if score is None else {'score': score}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One judge protocol: its prompts, the record fields they quote, how a reply parses.

  `user` is a `str.format` template over `fields`; `version` keys the verdict cache, so it
  changes whenever a prompt's text does.
  """
  name: str
  version: str
  system: str
  user: str
  fields: tuple[str, ...]
  parse: Callable[[str | None], dict | None]

  def messages(self, r: Mapping) -> list[dict]:
    """The chat messages asking the judge about record `r`."""
    return [{'role': 'system', 'content': self.system},
            {'role': 'user', 'content': self.user.format(**{k: r[k] for k in self.fields})}]


QA = Protocol('qa', PROMPT_VERSION, SYSTEM_PROMPT, USER_PROMPT, ('question', 'answer', 'pred'),
              parse_verdict)

# Video-ChatGPT's video-based generative performance benchmark (quantitative_evaluation/
# evaluate_benchmark_{1_correctness,2_detailed_orientation,3_context,4_temporal,5_consistency}
# .py), text unchanged, including the malformed example `{''score': 4.8}`. Each asks for one
# integer score 0-5; the benchmark's number is the mean over the judged entries.
_QA_USER_HEAD = ('Please evaluate the following video-based question-answer pair:\n\n'
                 'Question: {question}\n'
                 'Correct Answer: {answer}\n'
                 'Predicted Answer: {pred}\n\n')
_SCORE_TAIL = ('DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python '
               'dictionary string. '
               "For example, your response should look like this: {{''score': 4.8}}.")
_FIELDS = ('question', 'answer', 'pred')

BENCHMARK_PROTOCOLS = {
    'correctness': Protocol(
        'correctness', 'video-chatgpt-correctness-v1',
        'You are an intelligent chatbot designed for evaluating the factual accuracy of '
        'generative outputs for video-based question-answer pairs. '
        'Your task is to compare the predicted answer with the correct answer and determine if '
        "they are factually consistent. Here's how you can accomplish the task:"
        '------'
        '##INSTRUCTIONS: '
        '- Focus on the factual consistency between the predicted answer and the correct '
        'answer. The predicted answer should not contain any misinterpretations or '
        'misinformation.\n'
        '- The predicted answer must be factually accurate and align with the video content.\n'
        '- Consider synonyms or paraphrases as valid matches.\n'
        '- Evaluate the factual accuracy of the prediction compared to the answer.',
        _QA_USER_HEAD +
        'Provide your evaluation only as a factual accuracy score where the factual accuracy '
        'score is an integer value between 0 and 5, with 5 indicating the highest level of '
        'factual consistency. '
        "Please generate the response in the form of a Python dictionary string with keys "
        "'score', where its value is the factual accuracy score in INTEGER, not STRING."
        + _SCORE_TAIL, _FIELDS, parse_score),
    'detail': Protocol(
        'detail', 'video-chatgpt-detail-v1',
        'You are an intelligent chatbot designed for evaluating the detail orientation of '
        'generative outputs for video-based question-answer pairs. '
        'Your task is to compare the predicted answer with the correct answer and determine its '
        "level of detail, considering both completeness and specificity. Here's how you can "
        'accomplish the task:'
        '------'
        '##INSTRUCTIONS: '
        '- Check if the predicted answer covers all major points from the video. The response '
        'should not leave out any key aspects.\n'
        '- Evaluate whether the predicted answer includes specific details rather than just '
        'generic points. It should provide comprehensive information that is tied to specific '
        'elements of the video.\n'
        '- Consider synonyms or paraphrases as valid matches.\n'
        '- Provide a single evaluation score that reflects the level of detail orientation of '
        'the prediction, considering both completeness and specificity.',
        _QA_USER_HEAD +
        'Provide your evaluation only as a detail orientation score where the detail '
        'orientation score is an integer value between 0 and 5, with 5 indicating the highest '
        'level of detail orientation. '
        "Please generate the response in the form of a Python dictionary string with keys "
        "'score', where its value is the detail orientation score in INTEGER, not STRING."
        + _SCORE_TAIL, _FIELDS, parse_score),
    'context': Protocol(
        'context', 'video-chatgpt-context-v1',
        'You are an intelligent chatbot designed for evaluating the contextual understanding of '
        'generative outputs for video-based question-answer pairs. '
        'Your task is to compare the predicted answer with the correct answer and determine if '
        'the generated response aligns with the overall context of the video content. Here\'s '
        'how you can accomplish the task:'
        '------'
        '##INSTRUCTIONS: '
        '- Evaluate whether the predicted answer aligns with the overall context of the video '
        'content. It should not provide information that is out of context or misaligned.\n'
        '- The predicted answer must capture the main themes and sentiments of the video.\n'
        '- Consider synonyms or paraphrases as valid matches.\n'
        '- Provide your evaluation of the contextual understanding of the prediction compared '
        'to the answer.',
        _QA_USER_HEAD +
        'Provide your evaluation only as a contextual understanding score where the contextual '
        'understanding score is an integer value between 0 and 5, with 5 indicating the highest '
        'level of contextual understanding. '
        "Please generate the response in the form of a Python dictionary string with keys "
        "'score', where its value is contextual understanding score in INTEGER, not STRING."
        + _SCORE_TAIL, _FIELDS, parse_score),
    'temporal': Protocol(
        'temporal', 'video-chatgpt-temporal-v1',
        'You are an intelligent chatbot designed for evaluating the temporal understanding of '
        'generative outputs for video-based question-answer pairs. '
        'Your task is to compare the predicted answer with the correct answer and determine if '
        'they correctly reflect the temporal sequence of events in the video content. Here\'s '
        'how you can accomplish the task:'
        '------'
        '##INSTRUCTIONS: '
        '- Focus on the temporal consistency between the predicted answer and the correct '
        'answer. The predicted answer should correctly reflect the sequence of events or '
        'details as they are presented in the video content.\n'
        '- Consider synonyms or paraphrases as valid matches, but only if the temporal order is '
        'maintained.\n'
        '- Evaluate the temporal accuracy of the prediction compared to the answer.',
        _QA_USER_HEAD +
        'Provide your evaluation only as a temporal accuracy score where the temporal accuracy '
        'score is an integer value between 0 and 5, with 5 indicating the highest level of '
        'temporal consistency. '
        "Please generate the response in the form of a Python dictionary string with keys "
        "'score', where its value is the temporal accuracy score in INTEGER, not STRING."
        + _SCORE_TAIL, _FIELDS, parse_score),
    # Both questions and both answers of a pair (copies of the reference script that read
    # question 2 from "Q1" showed the judge the first question twice).
    'consistency': Protocol(
        'consistency', 'video-chatgpt-consistency-v1',
        'You are an intelligent chatbot designed for evaluating the consistency of generative '
        'outputs for similar video-based question-answer pairs. '
        'You will be given two very similar questions, a common answer common to both the '
        'questions and predicted answers for the two questions .'
        'Your task is to compare the predicted answers for two very similar question, with a '
        'common correct answer and determine if they are consistent. Here\'s how you can '
        'accomplish the task:'
        '------'
        '##INSTRUCTIONS: '
        '- Focus on the consistency between the two predicted answers and the correct answer. '
        'Both predicted answers should correspond to the correct answer and to each other, and '
        'should not contain any contradictions or significant differences in the conveyed '
        'information.\n'
        '- Both predicted answers must be consistent with each other and the correct answer, in '
        'terms of the information they provide about the video content.\n'
        '- Consider synonyms or paraphrases as valid matches, but only if they maintain the '
        'consistency in the conveyed information.\n'
        '- Evaluate the consistency of the two predicted answers compared to the correct '
        'answer.',
        'Please evaluate the following video-based question-answer pair:\n\n'
        'Question 1: {question}\n'
        'Question 2: {question2}\n'
        'Correct Answer: {answer}\n'
        'Predicted Answer to Question 1: {pred}\n'
        'Predicted Answer to Question 2: {pred2}\n\n'
        'Provide your evaluation only as a consistency score where the consistency score is an '
        'integer value between 0 and 5, with 5 indicating the highest level of consistency. '
        "Please generate the response in the form of a Python dictionary string with keys "
        "'score', where its value is the consistency score in INTEGER, not STRING."
        + _SCORE_TAIL, ('question', 'question2', 'answer', 'pred', 'pred2'), parse_score),
}
PROTOCOLS = ('qa',) + tuple(BENCHMARK_PROTOCOLS)


def _digest(r: Mapping, fields: Sequence[str] = QA.fields) -> str:
  """Identifies the judged text, so a changed prediction is not served an old verdict."""
  text = json.dumps([r[k] for k in fields], ensure_ascii=False)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def verdicts_path(out: str) -> str:
  """Where the verdicts of `out` are cached: scores.json -> scores.verdicts.jsonl."""
  stem = out[:-len('.json')] if out.endswith('.json') else out
  return stem + '.verdicts.jsonl'


def load_verdicts(path: str) -> dict:
  """{(id, model, prompt_version): entry} from a verdicts file; later lines win. Unreadable lines
  (a torn last line from a kill) are skipped, and the file is rewritten without them so that
  appends start on a fresh line."""
  if not storage.exists(path):
    return {}
  cache, keep, bad = {}, [], 0
  for line in storage.read_text(path).splitlines(keepends=True):
    try:
      e = json.loads(line)
      key = (e['id'], e['model'], e['prompt_version'])
    except (json.JSONDecodeError, KeyError, TypeError):
      bad += 1
      continue
    cache[key] = e
    keep.append(line if line.endswith('\n') else line + '\n')
  if bad:
    logging.warning('%s: dropped %d unreadable line(s)', path, bad)
    storage.write_text(path, ''.join(keep))
  return cache


class JudgeError(RuntimeError):
  """A judge request failed for good (after retries, or one that retrying cannot fix)."""


@dataclasses.dataclass
class Judge:
  """Asks an OpenAI-compatible chat server for Video-ChatGPT verdicts.

  Args:
    client: an `openai.OpenAI` (built with max_retries=0: retries happen here).
    model: the judge model name.
    protocol: the prompts and verdict form (`QA`, or one of `BENCHMARK_PROTOCOLS`).
    max_attempts: tries per question for retryable failures (429, 5xx, timeout, connection).
    backoff_s, max_backoff_s: the wait before retry k is min(max, backoff * 2**k), jittered
      (a 429's Retry-After, when given, is waited at least).
  """
  client: Any
  model: str = 'gpt-3.5-turbo'
  max_attempts: int = 6
  backoff_s: float = 1.0
  max_backoff_s: float = 60.0
  sleep: Callable[[float], None] = time.sleep
  protocol: Protocol = QA

  def ask(self, r: Mapping) -> str:
    """The judge's raw reply about record `r` ('' when it has no text)."""
    import openai
    retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
    for attempt in range(self.max_attempts):
      try:
        reply = self.client.chat.completions.create(
            model=self.model, temperature=0,
            messages=self.protocol.messages(r))
        try:
          return reply.choices[0].message.content or ''
        except (AttributeError, IndexError, TypeError):   # a reply without a message: unparsed
          return ''
      except retryable as e:
        if attempt + 1 == self.max_attempts:
          raise JudgeError(f'question {r["id"]!r}: {_describe(e)}, still after '
                           f'{self.max_attempts} attempts') from e
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1)
        wait = max(wait, _retry_after(e))
        logging.info('question %r: %s; retrying in %.1fs', r['id'], _describe(e), wait)
        self.sleep(wait)
      except openai.APIError as e:          # 4xx other than 429, or a malformed response
        raise JudgeError(f'question {r["id"]!r}: {_describe(e)} (not retried: check --base_url, '
                         '--model and OPENAI_API_KEY)') from e
    raise AssertionError('unreachable')


def _describe(e: Exception) -> str:
  status = getattr(e, 'status_code', None)
  return f'{type(e).__name__}' + (f' (HTTP {status})' if status else '') + f': {e}'


def _retry_after(e: Exception) -> float:
  response = getattr(e, 'response', None)
  try:
    return min(60.0, float(response.headers.get('retry-after', 0)))
  except (AttributeError, TypeError, ValueError):
    return 0.0


def judge_records(judge: Judge, records: Sequence[Mapping], cache_path: str, workers: int = 8,
                  retry_unparsed: bool = False, progress: bool = True) -> dict:
  """Verdicts for `records`, asking `judge` only for those `cache_path` lacks (and, with
  `retry_unparsed`, those it holds unparsed); each new one is appended there at once.

  Returns {id: cache entry} for every record. Raises JudgeError when a request fails for good;
  the requests already answered stay in the cache.
  """
  from tqdm import tqdm
  if workers < 1:
    raise ValueError(f'workers={workers} must be at least 1')
  cache = load_verdicts(cache_path)
  protocol = judge.protocol
  found, todo = {}, []
  for r in records:
    e = cache.get((r['id'], judge.model, protocol.version))
    if e is not None and e.get('digest') == _digest(r, protocol.fields) and (
        e.get('verdict') is not None or not retry_unparsed):
      found[r['id']] = e
    else:
      todo.append(r)
  logging.info('%d verdict(s) cached in %s, %d to ask', len(found), cache_path, len(todo))
  if not todo:
    return found
  bar = tqdm(total=len(todo), desc='judging', unit='q', disable=not progress, file=sys.stderr)
  with storage.LineLog(cache_path) as f, cf.ThreadPoolExecutor(workers) as pool:
    futures = {pool.submit(judge.ask, r): r for r in todo}
    try:
      for fut in cf.as_completed(futures):
        r = futures[fut]
        raw = fut.result()
        e = {'id': r['id'], 'model': judge.model, 'prompt_version': protocol.version,
             'digest': _digest(r, protocol.fields), 'verdict': protocol.parse(raw), 'raw': raw}
        f.append(json.dumps(e, ensure_ascii=False))
        found[r['id']] = e
        bar.update(1)
    except BaseException:
      for fut in futures:                 # stop asking; the ones in flight finish and are lost
        fut.cancel()
      raise
    finally:
      bar.close()
  return found


def _judge_metrics(records: Sequence[Mapping], verdicts: Mapping) -> dict:
  vs = [verdicts[r['id']]['verdict'] for r in records]
  ok = [v for v in vs if v is not None]
  return {'judged': len(ok), 'unparsed': len(vs) - len(ok),
          'accuracy': sum(v['pred'] == 'yes' for v in ok) / len(ok) if ok else None,
          'score': sum(v['score'] for v in ok) / len(ok) if ok else None}


def judge_summary(records: Sequence[Mapping], verdicts: Mapping, model: str) -> dict:
  """The `judge` section: `model`, `prompt_version`, `accuracy` (yes / judged), `score` (mean
  over judged), `judged`, `unparsed` (with their ids in `unparsed_ids`) and the same by type."""
  out = {'model': model, 'prompt_version': PROMPT_VERSION}
  out.update(_judge_metrics(records, verdicts))
  out['unparsed_ids'] = [r['id'] for r in records if verdicts[r['id']]['verdict'] is None]
  typed = any(r.get('type') is not None for r in records)
  out['by_type'] = ({t: _judge_metrics(rs, verdicts) for t, rs in _by_type(records).items()}
                    if typed else {})
  return out


def benchmark_summary(records: Sequence[Mapping], verdicts: Mapping, model: str,
                      protocol: Protocol) -> dict:
  """The `judge` section of a fine-grained benchmark protocol: `model`, `protocol`,
  `prompt_version`, `score` (the benchmark's figure: mean 0-5 score over the judged entries),
  `judged`, `unparsed` (with their ids in `unparsed_ids`) and `histogram` ({score: count})."""
  scores = [verdicts[r['id']]['verdict'] for r in records]
  ok = [v['score'] for v in scores if v is not None]
  return {'model': model, 'protocol': protocol.name, 'prompt_version': protocol.version,
          'score': sum(ok) / len(ok) if ok else None, 'judged': len(ok),
          'unparsed': len(scores) - len(ok),
          'unparsed_ids': [r['id'] for r, v in zip(records, scores) if v is None],
          'histogram': {str(k): ok.count(k) for k in range(6)}}


def make_client(base_url: str | None, timeout_s: float = 120.0):
  """An `openai.OpenAI` for `base_url` (None: the OpenAI API), without its own retries."""
  import openai
  key = os.environ.get('OPENAI_API_KEY')
  if not key:
    if not base_url:
      raise ValueError('OPENAI_API_KEY is not set; it is needed for the OpenAI API (a local '
                       'server given with --base_url accepts any key)')
    key = 'unused'
  return openai.OpenAI(api_key=key, base_url=base_url or None, max_retries=0, timeout=timeout_s)


def run(predictions: str, out: str, judge: str = 'none', base_url: str | None = None,
        model: str = 'gpt-3.5-turbo', workers: int = 8, retry_unparsed: bool = False,
        judge_obj: Judge | None = None, progress: bool = True, protocol: str = 'qa') -> dict:
  """Scores `predictions` into `out` (JSON) and returns what was written.

  `protocol` 'qa' (VideoQA predictions, judged yes/no + 0-5) or one of the fine-grained
  benchmark's: 'correctness', 'detail', 'context' (answers to generic_qa.json), 'temporal'
  (temporal_qa.json), 'consistency' (consistency_qa.json pairs), each judged 0-5.
  """
  if judge not in ('none', 'openai'):
    raise ValueError(f'judge={judge!r}; expected "none" or "openai"')
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol={protocol!r}; expected one of {", ".join(PROTOCOLS)}')
  if protocol == 'qa':
    records = read_predictions(predictions)
  else:
    records = read_benchmark_predictions(
        predictions, 'consistency' if protocol == 'consistency' else 'generic')
  if not records:
    raise ValueError(f'{predictions}: no predictions')
  result = {'predictions': str(storage.path(predictions)), 'protocol': protocol}
  if protocol == 'qa':
    result.update(score_records(records))
    result['baseline'] = majority_baseline(records)
  else:
    result.update(score_benchmark(records))
  if judge == 'openai':
    p = QA if protocol == 'qa' else BENCHMARK_PROTOCOLS[protocol]
    j = dataclasses.replace(judge_obj, protocol=p) if judge_obj else Judge(
        make_client(base_url), model=model, protocol=p)
    verdicts = judge_records(j, records, verdicts_path(out), workers, retry_unparsed, progress)
    result['judge'] = (judge_summary(records, verdicts, j.model) if protocol == 'qa' else
                       benchmark_summary(records, verdicts, j.model, p))
  storage.write_json(out, result, indent=1)
  return result


def _fmt(x):
  return '-' if x is None else f'{x:.4f}'


def main(argv):
  from absl import app, flags
  del argv
  f = flags.FLAGS
  for name in ('predictions', 'out'):
    if not getattr(f, name):
      raise app.UsageError(f'--{name} is required')
  try:
    result = run(f.predictions, f.out, f.judge, f.base_url or None, f.model, f.workers,
                 f.retry_unparsed, protocol=f.protocol)
  except (ValueError, OSError, JudgeError) as e:
    print(f'error: {e}', file=sys.stderr)
    if isinstance(e, JudgeError):
      print(f'verdicts so far are kept in {verdicts_path(f.out)}; rerun the same command to '
            'resume', file=sys.stderr)
    sys.exit(1 if isinstance(e, JudgeError) else 2)
  if f.protocol != 'qa':
    pair = (f', between the answers of a pair {_fmt(result["pair_token_f1"])}'
            if 'pair_token_f1' in result else '')
    print(f'{f.out}: {result["count"]} {f.protocol} predictions, token F1 '
          f'{_fmt(result["token_f1"])}{pair}')
    if 'judge' in result:
      j = result['judge']
      print(f'judge {j["model"]} ({j["prompt_version"]}): {f.protocol} score {_fmt(j["score"])} '
            f'(0-5), {j["judged"]} judged, {j["unparsed"]} unparsed')
    return
  print(f'{f.out}: {result["count"]} predictions, exact match {_fmt(result["exact_match"])}, '
        f'token F1 {_fmt(result["token_f1"])}')
  if 'judge' in result:
    j = result['judge']
    print(f'judge {j["model"]} ({j["prompt_version"]}): accuracy {_fmt(j["accuracy"])}, '
          f'score {_fmt(j["score"])}, {j["judged"]} judged, {j["unparsed"]} unparsed')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('predictions', None, 'Predictions (JSON lines from eval.videoqa, or a '
                      'JSON list from the reference\'s benchmark generation scripts).')
  flags.DEFINE_string('out', None, 'Scores (JSON); verdicts are cached beside it.')
  flags.DEFINE_enum('judge', 'none', ['none', 'openai'], 'LLM judge (Video-ChatGPT protocol).')
  flags.DEFINE_enum('protocol', 'qa', list(PROTOCOLS),
                    'qa: VideoQA (yes/no + 0-5); correctness, detail, context (generic_qa.json '
                    'answers), temporal (temporal_qa.json), consistency (consistency_qa.json): '
                    'the fine-grained benchmark (0-5).')
  flags.DEFINE_string('base_url', '', 'OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1); '
                      'empty: the OpenAI API.')
  flags.DEFINE_string('model', 'gpt-3.5-turbo', 'Judge model name.')
  flags.DEFINE_integer('workers', 8, 'Concurrent judge requests.')
  flags.DEFINE_bool('retry_unparsed', False, 'Ask again for cached verdicts that did not parse.')
  app.run(main)
