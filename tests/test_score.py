"""Scoring VideoQA predictions: normalisation, exact match, token F1, majority baselines, and the
Video-ChatGPT judge against a fake OpenAI-compatible server on 127.0.0.1 (retries, unparsed
verdicts, concurrency, the verdict cache); the fine-grained benchmark's five protocols (their
prompts, averages, both answers of a consistency pair) against the same server."""

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from panda_jax.eval import score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Judge-free metrics -----------------------------------------------------------------------

@pytest.mark.parametrize('raw, want', [
    ('The Dog.', 'dog'),
    ('  a   MAN,  riding an elephant! ', 'man riding elephant'),
    ('two', '2'),
    ('Two dogs', '2 dogs'),
    ('twenty-one', '21'),
    ('twenty one cats', '21 cats'),
    ('zero', '0'),
    ('3.5 metres', '3.5 metres'),
    ("don't", 'dont'),
    ('the', ''),
    ('', ''),
    ('another', 'another'),        # an article only as a whole word
])
def test_normalize_answer(raw, want):
  assert score.normalize_answer(raw) == want


def test_normalize_answer_rejects_non_strings():
  with pytest.raises(TypeError, match='must be a string, got int: 3'):
    score.normalize_answer(3)


def test_exact_match():
  assert score.exact_match('Two.', '2') == 1.0
  assert score.exact_match('the Kitchen', 'kitchen') == 1.0
  assert score.exact_match('2', 'three') == 0.0
  assert score.exact_match('a dog', 'dogs') == 0.0


def test_token_f1():
  assert score.token_f1('a man is cooking', 'man cooking') == pytest.approx(2 * (2 / 3) * 1 / (
      2 / 3 + 1))
  assert score.token_f1('dog', 'cat') == 0.0
  assert score.token_f1('The cat', 'cat') == 1.0
  assert score.token_f1('', '') == 1.0
  assert score.token_f1('the', 'cat') == 0.0
  # Repeated tokens count once per occurrence on both sides.
  assert score.token_f1('dog dog dog', 'dog') == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


RECORDS = [
    {'id': 'a', 'question': 'what?', 'answer': 'dog', 'pred': 'a dog', 'type': 'what'},
    {'id': 'b', 'question': 'what?', 'answer': 'cat', 'pred': 'dog', 'type': 'what'},
    {'id': 'c', 'question': 'what?', 'answer': 'Dog.', 'pred': 'the dog runs', 'type': 'what'},
    {'id': 'd', 'question': 'how many?', 'answer': 'two', 'pred': '2', 'type': 'count'},
    {'id': 'e', 'question': 'how many?', 'answer': '3', 'pred': 'three', 'type': 'count'},
    {'id': 'f', 'question': 'how many?', 'answer': 'one', 'pred': '4', 'type': 'count'},
]


def test_score_records_overall_and_by_type():
  s = score.score_records(RECORDS)
  assert s['count'] == 6
  assert s['exact_match'] == pytest.approx(3 / 6)
  f1_c = 2 / 3                      # "dog runs" vs "dog": precision 1/2, recall 1
  assert s['token_f1'] == pytest.approx((1 + 0 + f1_c + 1 + 1 + 0) / 6)
  assert s['by_type']['what'] == {'count': 3, 'exact_match': pytest.approx(1 / 3),
                                  'token_f1': pytest.approx((1 + f1_c) / 3)}
  assert s['by_type']['count'] == {'count': 3, 'exact_match': pytest.approx(2 / 3),
                                   'token_f1': pytest.approx(2 / 3)}
  untyped = [{k: v for k, v in r.items() if k != 'type'} for r in RECORDS]
  assert score.score_records(untyped)['by_type'] == {}
  assert score.score_records([]) == {'count': 0, 'exact_match': None, 'token_f1': None,
                                     'by_type': {}}


def test_majority_baseline_per_type_with_deterministic_ties():
  b = score.majority_baseline(RECORDS)
  # 'what': dog x2 (after normalisation), cat x1.
  assert b['what'] == {'answer': 'dog', 'accuracy': pytest.approx(2 / 3), 'count': 3}
  # 'count': 2, 3, 1 once each: a tie, broken by the alphabetically first normalised answer.
  assert b['count'] == {'answer': '1', 'accuracy': pytest.approx(1 / 3), 'count': 3}
  assert score.majority_baseline(RECORDS[::-1]) == b
  # Without types: one group.
  untyped = [{k: v for k, v in r.items() if k != 'type'} for r in RECORDS]
  assert score.majority_baseline(untyped) == {
      score.UNTYPED: {'answer': 'dog', 'accuracy': pytest.approx(2 / 6), 'count': 6}}


def test_read_predictions_tolerates_only_a_torn_last_line(tmp_path):
  p = tmp_path / 'p.jsonl'
  lines = [json.dumps(r) + '\n' for r in RECORDS[:2]]
  p.write_text(''.join(lines) + lines[0][:12])
  assert [r['id'] for r in score.read_predictions(str(p))] == ['a', 'b']
  p.write_text(lines[0][:12] + '\n' + lines[1])
  with pytest.raises(ValueError, match=r'p.jsonl:1: not a JSON object'):
    score.read_predictions(str(p))
  p.write_text(lines[0] + lines[0])
  with pytest.raises(ValueError, match="id 'a' already on line 1"):
    score.read_predictions(str(p))
  p.write_text(json.dumps({'id': 'x', 'answer': 'y'}) + '\n')
  with pytest.raises(ValueError, match=r"missing \['question', 'pred'\]"):
    score.read_predictions(str(p))


# --- Verdict parsing --------------------------------------------------------------------------

@pytest.mark.parametrize('text, want', [
    ("{'pred': 'yes', 'score': 4}", {'pred': 'yes', 'score': 4}),
    ('{"pred": "no", "score": 0}', {'pred': 'no', 'score': 0}),
    ("  {'pred': 'Yes', 'score': 4.8}\n", {'pred': 'yes', 'score': 4}),
    ("```python\n{'pred': 'no', 'score': '2'}\n```", {'pred': 'no', 'score': 2}),
    ('The prediction is correct. Score: 5', None),
    ("Sure! {'pred': 'yes', 'score': 5}", None),
    ("{'pred': 'maybe', 'score': 3}", None),
    ("{'pred': 'yes', 'score': 7}", None),
    ("{'pred': 'yes', 'score': True}", None),
    ("{'pred': 'yes'}", None),
    ("['yes', 4]", None),
    ('', None),
    (None, None),
])
def test_parse_verdict(text, want):
  assert score.parse_verdict(text) == want


def test_prompt_is_video_chatgpts():
  system, user = score.judge_messages('Q?', 'A', 'P')
  assert system['role'] == 'system' and user['role'] == 'user'
  assert system['content'].startswith('You are an intelligent chatbot designed for evaluating')
  assert 'Question: Q?\nCorrect Answer: A\nPredicted Answer: P\n\n' in user['content']
  assert user['content'].endswith("{'pred': 'yes', 'score': 4.8}.")


# --- The judge against a fake server ----------------------------------------------------------

class FakeJudgeServer:
  """An OpenAI-compatible chat server on 127.0.0.1: for each question, a scripted list of
  replies (an int is that HTTP error status; a string is the verdict text), the last repeated."""

  def __init__(self, script, delay_s=0.0):
    self.script = script
    self.delay_s = delay_s
    self.requests = []
    self.in_flight = 0
    self.max_in_flight = 0
    self.lock = threading.Lock()
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        with fake.lock:
          fake.in_flight += 1
          fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
          # The QA and single-answer prompts quote "Question:", the consistency one
          # "Question 1:" (its first question keys the script).
          question = re.search(r'Question(?: 1)?: (.*)\n',
                               body['messages'][1]['content']).group(1)
          n = sum(q == question for q, _ in fake.requests)
          fake.requests.append((question, body))
        try:
          time.sleep(fake.delay_s)
          replies = fake.script[question]
          reply = replies[min(n, len(replies) - 1)]
          if self.path != '/v1/chat/completions':
            reply = 404
          if isinstance(reply, int):
            self._send(reply, {'error': {'message': f'scripted {reply}', 'type': 'x'}},
                       {'Retry-After': '0'} if reply == 429 else {})
          else:
            self._send(200, {'id': 'c1', 'object': 'chat.completion', 'created': 0,
                             'model': body['model'],
                             'choices': [{'index': 0, 'finish_reason': 'stop',
                                          'message': {'role': 'assistant', 'content': reply}}],
                             'usage': {'prompt_tokens': 1, 'completion_tokens': 1,
                                       'total_tokens': 2}})
        finally:
          with fake.lock:
            fake.in_flight -= 1

      def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        for k, v in (headers or {}).items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.server.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}/v1'
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()


YES5 = "{'pred': 'yes', 'score': 5}"
NO1 = '{"pred": "no", "score": 1}'
SCRIPT = {
    'q_a': [YES5],
    'q_b': [500, NO1],                                   # a server error, then an answer
    'q_c': [429, 429, "{'pred': 'yes', 'score': 3}"],    # rate limited twice
    'q_d': ['I think the prediction is right, so yes.'],  # prose: unparsed
    'q_e': [YES5],
    'q_f': [NO1],
}


def _records():
  return [dict(r, question=f'q_{r["id"]}') for r in RECORDS]


def _write_preds(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def _judge(url, model='judge-1'):
  return score.Judge(score.make_client(url, timeout_s=10), model=model, backoff_s=0.01,
                     max_backoff_s=0.05)


@pytest.fixture
def no_key(monkeypatch):
  monkeypatch.delenv('OPENAI_API_KEY', raising=False)


def test_judge_aggregates_retries_and_caches(tmp_path, no_key):
  preds = tmp_path / 'p.jsonl'
  _write_preds(preds, _records())
  out = str(tmp_path / 'scores.json')
  with FakeJudgeServer(SCRIPT) as server:
    result = score.run(str(preds), out, judge='openai', workers=2,
                       judge_obj=_judge(server.url), progress=False)
    asked = [q for q, _ in server.requests]
    assert sorted(asked) == sorted(['q_a', 'q_b', 'q_b', 'q_c', 'q_c', 'q_c', 'q_d', 'q_e', 'q_f'])
    body = server.requests[0][1]
    assert body['temperature'] == 0 and body['model'] == 'judge-1'
    assert body['messages'][0]['content'] == score.SYSTEM_PROMPT

    j = result['judge']
    assert (j['model'], j['prompt_version']) == ('judge-1', score.PROMPT_VERSION)
    # Judged: a yes5, b no1, c yes3, e yes5, f no1; d unparsed.
    assert (j['judged'], j['unparsed'], j['unparsed_ids']) == (5, 1, ['d'])
    assert j['accuracy'] == pytest.approx(3 / 5) and j['score'] == pytest.approx(15 / 5)
    assert j['by_type']['what'] == {'judged': 3, 'unparsed': 0, 'accuracy': pytest.approx(2 / 3),
                                    'score': pytest.approx(3.0)}
    assert j['by_type']['count'] == {'judged': 2, 'unparsed': 1, 'accuracy': 0.5,
                                     'score': pytest.approx(3.0)}
    assert json.load(open(out)) == json.loads(json.dumps(result))
    assert result['count'] == 6 and result['baseline']['what']['answer'] == 'dog'

    # Every verdict is in the cache, the unparsed one with its raw text.
    cache = [json.loads(l) for l in open(tmp_path / 'scores.verdicts.jsonl')]
    assert sorted(e['id'] for e in cache) == list('abcdef')
    d = next(e for e in cache if e['id'] == 'd')
    assert d['verdict'] is None and d['raw'] == SCRIPT['q_d'][0]

    # A second run asks nothing and gives the same scores.
    n = len(server.requests)
    again = score.run(str(preds), out, judge='openai', workers=2, judge_obj=_judge(server.url),
                      progress=False)
    assert len(server.requests) == n and again == result
    # --retry_unparsed asks again for the unparsed one only (now answered).
    server.script = dict(SCRIPT, q_d=[YES5])
    retried = score.run(str(preds), out, judge='openai', retry_unparsed=True,
                        judge_obj=_judge(server.url), progress=False)
    assert [q for q, _ in server.requests[n:]] == ['q_d']
    assert (retried['judge']['judged'], retried['judge']['unparsed']) == (6, 0)
    # Another judge model or an edited prediction is not served these verdicts.
    other = score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url, 'judge-2'),
                      progress=False)
    assert len(server.requests) == n + 1 + 6 and other['judge']['model'] == 'judge-2'
    edited = _records()
    edited[0]['pred'] = 'a cat'
    _write_preds(preds, edited)
    score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url), progress=False)
    assert [q for q, _ in server.requests[n + 7:]] == ['q_a']


def test_a_torn_cache_line_is_tolerated_and_resumed(tmp_path, no_key):
  preds = tmp_path / 'p.jsonl'
  _write_preds(preds, _records())
  out = str(tmp_path / 's.json')
  with FakeJudgeServer({q: [YES5] for q in SCRIPT}) as server:
    score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url), progress=False)
    cache = tmp_path / 's.verdicts.jsonl'
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text(''.join(lines[:3]) + lines[3][:20])    # killed while writing the 4th
    n = len(server.requests)
    result = score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url),
                       progress=False)
    assert len(server.requests) == n + 3 and result['judge']['judged'] == 6
    assert len([json.loads(l) for l in cache.read_text().splitlines()]) == 6


def test_requests_run_concurrently(tmp_path, no_key):
  records = [dict(RECORDS[0], id=f'x{i}', question=f'q{i}') for i in range(8)]
  preds = tmp_path / 'p.jsonl'
  _write_preds(preds, records)
  with FakeJudgeServer({f'q{i}': [YES5] for i in range(8)}, delay_s=0.3) as server:
    result = score.run(str(preds), str(tmp_path / 's.json'), judge='openai', workers=4,
                       judge_obj=_judge(server.url), progress=False)
  assert result['judge']['judged'] == 8
  assert server.max_in_flight > 1


def test_a_failure_that_retries_cannot_fix_stops_the_run_keeping_verdicts(tmp_path, no_key):
  preds = tmp_path / 'p.jsonl'
  _write_preds(preds, _records()[:2])
  out = str(tmp_path / 's.json')
  with FakeJudgeServer({'q_a': [YES5], 'q_b': [401]}) as server:
    with pytest.raises(score.JudgeError, match=r"question 'b'.*HTTP 401.*not retried"):
      score.run(str(preds), out, judge='openai', workers=1, judge_obj=_judge(server.url),
                progress=False)
    assert [json.loads(l)['id'] for l in open(tmp_path / 's.verdicts.jsonl')] == ['a']
    assert not os.path.exists(out)
    server.script['q_b'] = [503]
    with pytest.raises(score.JudgeError, match=r"question 'b'.*HTTP 503.*after 6 attempts"):
      score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url), progress=False)
    assert [q for q, _ in server.requests].count('q_a') == 1


def test_command_line(tmp_path, no_key):
  preds = tmp_path / 'p.jsonl'
  _write_preds(preds, _records())
  out = tmp_path / 'cli.json'
  env = dict(os.environ, OPENAI_API_KEY='dummy')
  with FakeJudgeServer({q: [YES5] for q in SCRIPT}) as server:
    args = [sys.executable, '-m', 'panda_jax.eval.score', f'--predictions={preds}',
            f'--out={out}', '--judge=openai', f'--base_url={server.url}', '--model=local',
            '--workers=3']
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'judge local (video-chatgpt-qa-v1): accuracy 1.0000, score 5.0000, 6 judged' \
        in run.stdout
    assert len(server.requests) == 6
    assert 'dummy' not in (tmp_path / 'cli.verdicts.jsonl').read_text() + out.read_text()
  plain = subprocess.run(args[:5], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
  assert plain.returncode == 0, plain.stderr[-3000:]
  assert 'judge' not in json.load(open(out)) and 'exact match 0.5000' in plain.stdout
  bad = subprocess.run(args[:3] + [f'--predictions={ROOT}/README.md'] + args[4:5], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and 'README.md:1: not a JSON object' in bad.stderr


# --- The fine-grained benchmark ---------------------------------------------------------------

@pytest.mark.parametrize('text, want', [
    ("{'score': 4}", {'score': 4}),
    ('{"score": 0}', {'score': 0}),
    ("{'score': 4.8}", {'score': 4}),
    ("```\n{'score': '3'}\n```", {'score': 3}),
    ("{''score': 4.8}", None),                    # the prompt's own malformed example
    ("{'score': 6}", None),
    ("{'score': -1}", None),
    ("{'pred': 'yes'}", None),
    ('Score: 4', None),
    (None, None),
])
def test_parse_score(text, want):
  assert score.parse_score(text) == want


def test_benchmark_prompts_are_video_chatgpts():
  r = {'question': 'Q?', 'question2': 'Q2?', 'answer': 'A', 'pred': 'P', 'pred2': 'P2'}
  heads = {'correctness': 'factual accuracy', 'detail': 'detail orientation',
           'context': 'contextual understanding', 'temporal': 'temporal understanding',
           'consistency': 'consistency'}
  for name, what in heads.items():
    p = score.BENCHMARK_PROTOCOLS[name]
    system, user = p.messages(r)
    assert system['content'].startswith(f'You are an intelligent chatbot designed for evaluating '
                                        f'the {what} of generative outputs')
    assert user['content'].startswith('Please evaluate the following video-based question-'
                                      'answer pair:\n\n')
    assert user['content'].endswith("For example, your response should look like this: "
                                    "{''score': 4.8}.")
    assert 'integer value between 0 and 5' in user['content']
    assert p.version == f'video-chatgpt-{name}-v1'
  _, user = score.BENCHMARK_PROTOCOLS['correctness'].messages(r)
  assert 'Question: Q?\nCorrect Answer: A\nPredicted Answer: P\n\n' in user['content']
  _, user = score.BENCHMARK_PROTOCOLS['consistency'].messages(r)
  assert ('Question 1: Q?\nQuestion 2: Q2?\nCorrect Answer: A\nPredicted Answer to Question 1: '
          'P\nPredicted Answer to Question 2: P2\n\n') in user['content']
  assert len({score.BENCHMARK_PROTOCOLS[n].version for n in heads} | {score.PROMPT_VERSION}) == 6


# Answers to generic_qa.json as the reference's generation script writes them: a JSON list of
# the file's entries plus "pred", no ids (v1 has two questions).
GENERIC = [
    {'video_name': 'v1', 'Q': 'gq1', 'A': 'a man cooks pasta', 'pred': 'a man cooks'},
    {'video_name': 'v1', 'Q': 'gq2', 'A': 'in a kitchen', 'pred': 'outdoors'},
    {'video_name': 'v2', 'Q': 'gq3', 'A': 'two dogs', 'pred': '2 dogs'},
    {'video_name': 'v3', 'Q': 'gq4', 'A': 'red', 'pred': 'blue'},
]
GENERIC_SCRIPT = {'gq1': ["{'score': 4}"], 'gq2': [429, "{'score': 4.8}"],
                  'gq3': [500, '{"score": 5}'], 'gq4': ['It deserves a 1.']}


@pytest.mark.parametrize('protocol', ['correctness', 'detail', 'context', 'temporal'])
def test_benchmark_protocols_average_scores_and_cache(tmp_path, no_key, protocol):
  preds = tmp_path / 'generic_preds.json'
  preds.write_text(json.dumps(GENERIC))
  out = str(tmp_path / f'{protocol}.json')
  p = score.BENCHMARK_PROTOCOLS[protocol]
  with FakeJudgeServer(GENERIC_SCRIPT) as server:
    result = score.run(str(preds), out, judge='openai', workers=2, judge_obj=_judge(server.url),
                       progress=False, protocol=protocol)
    assert sorted(q for q, _ in server.requests) == ['gq1', 'gq2', 'gq2', 'gq3', 'gq3', 'gq4']
    body = next(b for q, b in server.requests if q == 'gq2')
    assert body['messages'][0]['content'] == p.system and body['temperature'] == 0
    assert body['messages'][1]['content'] == p.user.format(question='gq2',
                                                           answer='in a kitchen', pred='outdoors')
    j = result['judge']
    # 4, int(4.8) = 4 and 5 judged; the prose verdict of v3 is unparsed, kept, not averaged.
    assert (j['protocol'], j['prompt_version'], j['model']) == (protocol, p.version, 'judge-1')
    assert (j['judged'], j['unparsed'], j['unparsed_ids']) == (3, 1, ['v3_0'])
    assert j['score'] == pytest.approx(13 / 3)
    assert j['histogram'] == {'0': 0, '1': 0, '2': 0, '3': 0, '4': 2, '5': 1}
    assert result['count'] == 4 and result['protocol'] == protocol
    assert result['token_f1'] == pytest.approx(
        sum(score.token_f1(r['pred'], r['A']) for r in GENERIC) / 4)
    cache = {e['id']: e for e in map(json.loads, open(tmp_path / f'{protocol}.verdicts.jsonl'))}
    assert sorted(cache) == ['v1_0', 'v1_1', 'v2_0', 'v3_0']     # the reference's keys
    assert cache['v3_0']['verdict'] is None and cache['v3_0']['raw'] == 'It deserves a 1.'
    assert json.load(open(out)) == json.loads(json.dumps(result))
    # A rerun asks nothing; another protocol on the same file is a different prompt: asked again.
    n = len(server.requests)
    assert score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url),
                     progress=False, protocol=protocol) == result
    assert len(server.requests) == n
    other = 'temporal' if protocol != 'temporal' else 'correctness'
    score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url), progress=False,
              protocol=other)
    assert len(server.requests) == n + 4


# Consistency pairs as panda_jax.eval.videoqa writes them (JSON lines with ids): the second
# question and answer differ from the first, so a judge shown the first twice is caught.
CONSISTENCY = [
    {'id': 'v1_0', 'video_name': 'v1', 'Q1': 'cq1 what is he doing?', 'Q2': 'describe his action',
     'A': 'he cooks pasta', 'pred1': 'he cooks', 'pred2': 'he is cooking pasta'},
    {'id': 'v2_0', 'video_name': 'v2', 'Q1': 'cq2 how many dogs?', 'Q2': 'count the dogs',
     'A': 'two', 'pred1': 'two dogs', 'pred2': 'three'},
    {'id': 'v3_0', 'video_name': 'v3', 'Q1': 'cq3 which colour?', 'Q2': 'what colour is it',
     'A': 'red', 'pred1': 'red', 'pred2': 'red'},
]


def test_consistency_judge_sees_both_answers_of_a_pair(tmp_path, no_key):
  preds = tmp_path / 'consistency.jsonl'
  _write_preds(preds, CONSISTENCY)
  out = str(tmp_path / 'consistency.json')
  script = {'cq1 what is he doing?': ["{'score': 4}"], 'cq2 how many dogs?': ["{'score': 1}"],
            'cq3 which colour?': [503, "{'score': 5}"]}
  with FakeJudgeServer(script) as server:
    result = score.run(str(preds), out, judge='openai', workers=3, judge_obj=_judge(server.url),
                       progress=False, protocol='consistency')
  p = score.BENCHMARK_PROTOCOLS['consistency']
  asked = {q: b['messages'] for q, b in server.requests}
  assert len(asked) == 3
  for r in CONSISTENCY:
    system, user = asked[r['Q1']]
    assert system['content'] == p.system
    assert (f'Question 1: {r["Q1"]}\nQuestion 2: {r["Q2"]}\nCorrect Answer: {r["A"]}\n'
            f'Predicted Answer to Question 1: {r["pred1"]}\n'
            f'Predicted Answer to Question 2: {r["pred2"]}\n\n') in user['content']
  j = result['judge']
  assert (j['judged'], j['unparsed'], j['score']) == (3, 0, pytest.approx(10 / 3))
  assert j['protocol'] == 'consistency'
  f1 = [score.token_f1(a, r['A']) for r in CONSISTENCY for a in (r['pred1'], r['pred2'])]
  assert result['token_f1'] == pytest.approx(sum(f1) / 6)
  assert result['pair_token_f1'] == pytest.approx(
      sum(score.token_f1(r['pred1'], r['pred2']) for r in CONSISTENCY) / 3)
  # The judged text covers the second answer: editing only pred2 asks that pair again.
  edited = [dict(r) for r in CONSISTENCY]
  edited[1]['pred2'] = 'two'
  _write_preds(preds, edited)
  with FakeJudgeServer(script) as server:
    score.run(str(preds), out, judge='openai', judge_obj=_judge(server.url), progress=False,
              protocol='consistency')
  assert [q for q, _ in server.requests] == ['cq2 how many dogs?']


def test_benchmark_predictions_of_the_wrong_kind_are_named(tmp_path):
  generic = tmp_path / 'generic.json'
  generic.write_text(json.dumps(GENERIC))
  with pytest.raises(ValueError, match=r"generic.json: entry 0: missing \['Q1', 'Q2', "
                     r"'pred1', 'pred2'\]; a consistency benchmark prediction needs .*is this "
                     r'a generic file \(--protocol=correctness\|detail\|context\|temporal\)'):
    score.run(str(generic), str(tmp_path / 's.json'), protocol='consistency')
  pairs = tmp_path / 'pairs.jsonl'
  _write_preds(pairs, CONSISTENCY)
  with pytest.raises(ValueError, match=r"pairs.jsonl:1: missing \['Q', 'pred'\].*is this a "
                     r'consistency file \(--protocol=consistency\)'):
    score.run(str(pairs), str(tmp_path / 's.json'), protocol='temporal')
  with pytest.raises(ValueError, match=r"protocol='detailed'; expected one of qa, correctness, "
                     r'detail, context, temporal, consistency'):
    score.run(str(generic), str(tmp_path / 's.json'), protocol='detailed')
  # Judge-free scoring needs no server.
  plain = score.run(str(generic), str(tmp_path / 's.json'), protocol='detail')
  assert plain['count'] == 4 and 'judge' not in plain and 'exact_match' not in plain


def test_benchmark_command_line(tmp_path, no_key):
  preds = tmp_path / 'consistency.jsonl'
  _write_preds(preds, CONSISTENCY)
  out = tmp_path / 'cons.json'
  with FakeJudgeServer({r['Q1']: ["{'score': 3}"] for r in CONSISTENCY}) as server:
    run = subprocess.run(
        [sys.executable, '-m', 'panda_jax.eval.score', f'--predictions={preds}', f'--out={out}',
         '--protocol=consistency', '--judge=openai', f'--base_url={server.url}', '--model=local'],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'judge local (video-chatgpt-consistency-v1): consistency score 3.0000 (0-5), 3 judged, ' \
      '0 unparsed' in run.stdout
  assert json.load(open(out))['judge']['score'] == 3.0
