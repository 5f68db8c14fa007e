"""`python -m panda_jax.serve`: the OpenAI-compatible server, driven by the `openai` client on
loopback. One server process (the tiny model of test_videoqa) serves every test here."""

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import openai
import pytest

from conftest import require_package, subprocess_env
from panda_jax.data import synthetic
from panda_jax.eval.videoqa import load_clip
from test_videoqa import FRAMES, setup  # noqa: F401  (the tiny model, tokenizer and videos)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'tiny-panda'
MAX_TOKENS = 6                      # as the fixture's Predictor (max_new_tokens=6)
MAX_QUEUE = 20
MAX_BODY_MB = 1.0
QUESTIONS = ('What moves to the left?', 'What colour is the square?', 'Describe the video.',
             'How many objects are there?')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _get(url):
  with urllib.request.urlopen(url, timeout=10) as r:
    return json.loads(r.read())


@pytest.fixture(scope='module')
def server(setup, tmp_path_factory):  # noqa: F811
  """The server on a free loopback port; yields its base URL."""
  port = _free_port()
  log = tmp_path_factory.mktemp('serve') / 'server.log'
  args = [sys.executable, '-m', 'panda_jax.serve', f'--checkpoint={setup["converted"]}',
          f'--tokenizer={setup["work"] / "tok"}', f'--port={port}', f'--model_name={MODEL}',
          f'--video_root={setup["video_root"]}', f'--frames={FRAMES}', '--max_batch=8',
          f'--max_queue={MAX_QUEUE}', '--max_tokens=64', '--max_frames=8',
          f'--max_body_mb={MAX_BODY_MB}', '--log_level=warning']
  with open(log, 'w') as out:
    proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(), stdout=out,
                            stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + 120
  while True:
    try:
      _get(f'{url}/health')
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f'the server did not start:\n{log.read_text()[-3000:]}')
      time.sleep(0.2)
  yield {'url': url, 'log': log}
  proc.terminate()
  try:
    proc.wait(10)
  except subprocess.TimeoutExpired:
    proc.kill()


def _client(server, cls=openai.OpenAI):
  return cls(base_url=f'{server["url"]}/v1', api_key='unused', max_retries=0, timeout=120)


def _video_part(path):
  return {'type': 'video_url', 'video_url': {'url': f'file://{path}'}}


def _data_part(path):
  data = base64.b64encode(open(path, 'rb').read()).decode()
  return {'type': 'video_url', 'video_url': {'url': f'data:video/mp4;base64,{data}'}}


def _messages(video_part, question):
  return [{'role': 'user', 'content': [video_part, {'type': 'text', 'text': question}]}]


def _greedy(setup, path, question):  # noqa: F811
  """What `predict` answers (the fixture's Predictor, greedy, 6 new tokens)."""
  v = load_clip(str(path), setup['cfg'].stab, FRAMES)
  return setup['predictor'].answer(v['pixels'][None], v['mask'][None], [question])[0]


def _greedy_turns(setup, path, history, question):  # noqa: F811
  """What `predict`'s Predictor answers to a conversation: its template's generation prompt
  with the earlier (question, answer) turns, the video in the first."""
  predictor = setup['predictor']
  template, tokenizer = predictor.template, predictor.tokenizer
  predictor.prompt_ids = lambda q, f: template.generation_ids(tokenizer, q, num_frames=f,
                                                              history=history)
  try:
    prompt = predictor.prompt_ids(question, FRAMES)
    assert all(np.isin(tokenizer(a, add_special_tokens=False).input_ids, prompt).all()
               for turn in history for a in turn)   # the history is in the prompt
    return _greedy(setup, path, question)
  finally:
    del predictor.prompt_ids


def test_health_and_models(server):
  assert _get(f'{server["url"]}/health')['status'] == 'ok'
  models = _client(server).models.list()
  assert [m.id for m in models.data] == [MODEL]


def _several_token_case(setup):  # noqa: F811
  """The first (clip, question) of the fixture's whose greedy answer is at least 6 characters
  of at least 2 tokens: one the streaming and stop-string checks can cut (what the tiny
  model answers depends on its random weights and the synthetic data's tokenizer)."""
  for path in sorted(setup['ds'].eval_videos):
    v = load_clip(str(path), setup['cfg'].stab, FRAMES)
    for question in QUESTIONS:
      ids = setup['predictor'].generate_ids(v['pixels'][None], v['mask'][None], [question])[0]
      want = _greedy(setup, path, question)
      if len(ids) >= 2 and len(want) >= 6:
        return path, question, want
  pytest.fail('the fixture model gives no answer of 2 tokens and 6 characters to any of '
              f'{QUESTIONS} on {len(setup["ds"].eval_videos)} clips')


def test_plain_and_streamed_answers_equal_predict(setup, server):  # noqa: F811
  client = _client(server)
  path, question, want = _several_token_case(setup)
  for part in (_video_part(path), _data_part(path)):
    r = client.chat.completions.create(model=MODEL, messages=_messages(part, question),
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ('stop', 'length')
    assert r.usage.completion_tokens <= MAX_TOKENS and r.usage.prompt_tokens > FRAMES
  pieces, reasons = [], []
  stream = client.chat.completions.create(model=MODEL, messages=_messages(
      _video_part(path), question), max_tokens=MAX_TOKENS, stream=True,
      stream_options={'include_usage': True})
  usage = None
  for chunk in stream:
    if chunk.usage:
      usage = chunk.usage
    for c in chunk.choices:
      if c.delta.content:
        pieces.append(c.delta.content)
      if c.finish_reason:
        reasons.append(c.finish_reason)
  assert ''.join(pieces) == want
  assert len(pieces) > 1                       # streamed step by step, not in one piece
  assert len(reasons) == 1 and usage.completion_tokens <= MAX_TOKENS

  # Multi-turn: the video in the first turn; a stop string cuts the answer.
  other = next(q for q in QUESTIONS if q != question)
  r = client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, messages=_messages(
      _video_part(path), question) + [{'role': 'assistant', 'content': want},
                                       {'role': 'user', 'content': other}])
  assert r.choices[0].message.content == _greedy_turns(setup, path, [(question, want)], other)
  stop = want[3:6]
  cut = want[:want.index(stop)].rstrip()
  r = client.chat.completions.create(model=MODEL, messages=_messages(
      _video_part(path), question), max_tokens=MAX_TOKENS, stop=[stop, 'never said'])
  assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, 'stop')
  stream = client.chat.completions.create(model=MODEL, messages=_messages(
      _video_part(path), question), max_tokens=MAX_TOKENS, stop=stop, stream=True)
  assert ''.join(c.choices[0].delta.content or '' for c in stream if c.choices) == cut

  # Sampling: temperature and top_p reach generate (an answer, whatever it is).
  r = client.chat.completions.create(model=MODEL, messages=_messages(
      _video_part(path), question), max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9)
  assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens >= 1


def test_concurrent_requests_are_batched_and_each_answered(setup, server):  # noqa: F811
  videos = sorted(setup['ds'].eval_videos)
  cases = [(videos[i % len(videos)], QUESTIONS[i % len(QUESTIONS)]) for i in range(16)]
  want = {c: _greedy(setup, *c) for c in set(cases)}
  before = _get(f'{server["url"]}/health')

  async def run():
    client = _client(server, openai.AsyncOpenAI)
    return await asyncio.gather(*[client.chat.completions.create(
        model=MODEL, messages=_messages(_video_part(p), q), max_tokens=MAX_TOKENS)
        for p, q in cases])

  results = asyncio.run(run())
  assert [r.choices[0].message.content for r in results] == [want[c] for c in cases]
  after = _get(f'{server["url"]}/health')
  assert after['answered'] - before['answered'] == 16
  sizes = {int(k): v - before['batch_sizes'].get(k, 0) for k, v in after['batch_sizes'].items()}
  assert after['batches'] - before['batches'] < 16 and max(k for k, v in sizes.items() if v) > 1


def test_bad_input_gets_its_error_while_a_good_request_completes(setup, server,  # noqa: F811
                                                                 tmp_path):
  videos = sorted(setup['ds'].eval_videos)
  broken = synthetic.write_broken_files(str(tmp_path))
  outside = tmp_path / 'outside.mp4'
  outside.write_bytes(open(videos[0], 'rb').read())
  good = _messages(_video_part(videos[0]), QUESTIONS[0])
  big = 'data:video/mp4;base64,' + 'A' * int(MAX_BODY_MB * (1 << 20) + 10)
  bad = {   # name: (request body or raw bytes, status, words in the message)
      'malformed json': (b'{"model": ', 400, 'not valid JSON'),
      'unknown model': ({'model': 'gpt-9', 'messages': good}, 404, 'does not exist'),
      'no video': ({'model': MODEL, 'messages': [{'role': 'user', 'content': 'hi'}]}, 400,
                   'no video'),
      'corrupt video': ({'model': MODEL, 'messages': _messages(_data_part(broken['not_video']),
                                                               'q')}, 400, 'cannot be decoded'),
      'not a video type': ({'model': MODEL, 'messages': _messages(
          {'type': 'video_url', 'video_url': {'url': 'data:image/png;base64,AAAA'}}, 'q')}, 400,
          'unsupported video type'),
      'outside the root': ({'model': MODEL, 'messages': _messages(_video_part(outside), 'q')},
                           400, 'outside'),
      'dot-dot escape': ({'model': MODEL, 'messages': _messages(
          _video_part(f'{setup["video_root"]}/../../{outside.name}'), 'q')}, 400, 'outside'),
      'remote url': ({'model': MODEL, 'messages': _messages(
          {'type': 'video_url', 'video_url': {'url': 'http://example.com/v.mp4'}}, 'q')}, 400,
          'not fetched'),
      'too large': ({'model': MODEL, 'messages': _messages(
          {'type': 'video_url', 'video_url': {'url': big}}, 'q')}, 413, 'at most'),
      'too many frames': ({'model': MODEL, 'messages': good, 'frames': 32}, 400,
                          'too many frames'),
      'too many tokens': ({'model': MODEL, 'messages': good, 'max_tokens': 100000}, 400,
                          'max_tokens=100000'),
      'too long a prompt': ({'model': MODEL, 'messages': _messages(
          _video_part(videos[0]), 'word ' * 3000)}, 400, 'text tokens'),
      'bad temperature': ({'model': MODEL, 'messages': good, 'temperature': -1}, 400,
                          'temperature=-1'),
  }
  want = _greedy(setup, videos[0], QUESTIONS[0])

  async def post(client, payload):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = await client.post('/v1/chat/completions', content=raw,
                          headers={'content-type': 'application/json'})
    return r.status_code, r.json()

  async def run():
    import httpx2 as httpx   # the openai client's HTTP library
    openai_client = _client(server, openai.AsyncOpenAI)
    # A streamed answer in flight (its video decoded, its request queued, the role chunk read)
    # and a plain one sent with the bad requests.
    stream = await openai_client.chat.completions.create(model=MODEL, messages=good,
                                                          max_tokens=MAX_TOKENS, stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.role == 'assistant'
    async with httpx.AsyncClient(base_url=server['url'], timeout=60) as client:
      *answers, plain = await asyncio.gather(
          *[post(client, b[0]) for b in bad.values()],
          openai_client.chat.completions.create(model=MODEL, messages=good,
                                                max_tokens=MAX_TOKENS))
      text = ''.join([c.choices[0].delta.content or '' async for c in stream if c.choices])
      assert plain.choices[0].message.content == want
      # The openai client raises the typed error for each.
      with pytest.raises(openai.NotFoundError, match='does not exist'):
        await openai_client.chat.completions.create(model='nope', messages=good)
      with pytest.raises(openai.BadRequestError, match='no video'):
        await openai_client.chat.completions.create(model=MODEL, messages=[
            {'role': 'user', 'content': 'hi'}])
    return answers, text

  answers, text = asyncio.run(run())
  for (name, (_, status, words)), (got_status, body) in zip(bad.items(), answers):
    assert got_status == status, (name, body)
    assert set(body['error']) >= {'message', 'type', 'param', 'code'}, (name, body)
    assert words in body['error']['message'], (name, body)
  assert text == want
  # Still serving.
  r = _client(server).chat.completions.create(model=MODEL, messages=good, max_tokens=MAX_TOKENS)
  assert r.choices[0].message.content == want


def test_a_full_queue_answers_429(setup, server):  # noqa: F811
  path = sorted(setup['ds'].eval_videos)[0]

  async def run():
    client = _client(server, openai.AsyncOpenAI)
    return await asyncio.gather(*[client.chat.completions.create(
        model=MODEL, messages=_messages(_video_part(path), QUESTIONS[0]), max_tokens=MAX_TOKENS)
        for _ in range(3 * MAX_QUEUE)], return_exceptions=True)

  results = asyncio.run(run())
  busy = [r for r in results if isinstance(r, openai.RateLimitError)]
  done = [r for r in results if not isinstance(r, Exception)]
  assert busy and done and len(busy) + len(done) == len(results), [
      r for r in results if isinstance(r, Exception) and r not in busy][:1]
  assert 'max_queue' in busy[0].message
  want = _greedy(setup, path, QUESTIONS[0])
  assert all(r.choices[0].message.content == want for r in done)
  assert _get(f'{server["url"]}/health')['admitted'] == 0      # every place given back


def _browser():
  """Headless Chromium from the system packages through Selenium, or a skip saying what is
  missing (Debian: `apt-get install chromium chromium-driver`; pip: selenium)."""
  import shutil
  require_package('selenium', 'pip install -r requirements-test.txt')
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  chromium = shutil.which('chromium') or shutil.which('chromium-browser')
  driver = shutil.which('chromedriver')
  if not chromium or not driver:
    message = 'no chromium / chromedriver (apt-get install chromium chromium-driver)'
    if os.environ.get('CI'):
      raise RuntimeError(message + ': .ci/run installs them')
    pytest.skip(message)
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  # No connection but to the page's server on loopback: no background networking, component
  # updates, sync, QUIC or first-run fetches.
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
              '--window-size=1200,800', '--disable-background-networking',
              '--disable-component-update', '--disable-sync', '--disable-quic',
              '--no-first-run', '--disable-default-apps', '--disable-extensions'):
    options.add_argument(arg)
  # An explicit driver: Selenium Manager downloads nothing.
  return webdriver.Chrome(options=options, service=Service(driver))


def test_the_page_in_a_browser(setup, server, tmp_path):  # noqa: F811
  """Loads `/`, uploads a clip, sees its frames, asks, waits for the streamed answer (equal to
  `predict`'s) and saves a screenshot that is not blank."""
  from PIL import Image
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  path = sorted(setup['ds'].eval_videos)[1]
  want = _greedy(setup, path, QUESTIONS[0])
  browser = _browser()
  try:
    wait = WebDriverWait(browser, 60)
    browser.get(server['url'] + '/')
    wait.until(lambda b: b.find_element(By.ID, 'model').text.endswith(MODEL))
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '#pick option')) > 1)
    browser.find_element(By.ID, 'upload').send_keys(str(path))
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '#frames img.frame')) == FRAMES)
    assert all(b.get_property('naturalWidth') > 0
               for b in browser.find_elements(By.CSS_SELECTOR, '#frames img.frame'))
    tokens = browser.find_element(By.ID, 'max-tokens')
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    browser.find_element(By.ID, 'question').send_keys(QUESTIONS[0])
    browser.find_element(By.ID, 'send').click()
    answer = wait.until(lambda b: [e for e in b.find_elements(By.CSS_SELECTOR, '.assistant')
                                   if e.get_attribute('data-state') in ('done', 'error')])[0]
    assert (answer.get_attribute('data-state'), answer.text) == ('done', want)
    shot = tmp_path / 'page.png'
    assert browser.save_screenshot(str(shot))
  finally:
    browser.quit()
  image = Image.open(shot).convert('RGB')
  assert image.size[0] >= 800 and len(image.getcolors(1 << 20) or range(1 << 20)) > 50
  assert image.convert('L').getextrema()[1] - image.convert('L').getextrema()[0] > 100
