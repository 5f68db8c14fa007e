"""`python -m panda_jax.predict`: one question about a video or a directory of videos, the answer
streamed as it is generated, clear errors for files that cannot be answered."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from panda_jax import predict
from panda_jax.data import synthetic
from panda_jax.eval.videoqa import load_clip
from test_videoqa import FRAMES, setup  # noqa: F401  (the tiny model, tokenizer and videos)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = 'What moves to the left?'


@pytest.fixture(scope='module')
def videos(setup, tmp_path_factory):  # noqa: F811
  """A directory: two videos, an undecodable .mp4 and a text file."""
  d = tmp_path_factory.mktemp('videos')
  # The first (by name) answers QUESTION with some text, so its answer can be seen streaming
  # (what the tiny model answers depends on its random weights and the synthetic tokenizer).
  clips = sorted(setup['ds'].eval_videos)
  speaking = [p for p in clips if _direct(setup, p)]
  if not speaking:
    pytest.fail(f'the fixture model answers {QUESTION!r} with nothing on all {len(clips)} clips')
  first = speaking[0]
  second = next(p for p in clips if p != first)
  for name, p in (('a_' + os.path.basename(first), first),
                  ('b_' + os.path.basename(second), second)):
    shutil.copy(p, d / name)
  broken = synthetic.write_broken_files(str(tmp_path_factory.mktemp('broken')))
  shutil.copy(broken['not_video'], d / 'zz_not_video.mp4')
  (d / 'notes.txt').write_text('not a video')
  return d


def _direct(setup, path):
  v = load_clip(str(path), setup['cfg'].stab, FRAMES)
  return setup['predictor'].answer(v['pixels'][None], v['mask'][None], [QUESTION])[0]


def test_answers_stream_token_by_token_and_failures_are_reported(setup, videos):  # noqa: F811
  paths, skipped = predict.list_videos(str(videos))
  assert [os.path.basename(p) for p in paths][-1] == 'zz_not_video.mp4' and len(paths) == 3
  assert [(os.path.basename(p), r.split(' (')[0]) for p, r in skipped] == [
      ('notes.txt', 'not a video file')]

  class Recorder(io.StringIO):
    writes = []

    def write(self, s):
      self.writes.append(s)
      return super().write(s)

  out, errors = Recorder(), []
  n = predict.answer_videos(setup['predictor'], paths, QUESTION, FRAMES, prefix=True, out=out,
                            report=lambda p, r: errors.append((os.path.basename(p), r)))
  assert n == 2
  lines = out.getvalue().splitlines()
  want = [f'{os.path.basename(p)}: {_direct(setup, p)}' for p in paths[:2]]
  assert lines == want
  # Streamed: the first answer arrived after its name, in pieces (as many as the tiny model's
  # answer has tokens that add text: token by token is checked on a scripted answer in
  # test_text_stream_writes_each_token_as_it_comes), before the second video's name.
  first = out.writes[:out.writes.index('\n')]
  assert len(first) >= 2 and first[0] == f'{os.path.basename(paths[0])}: '
  assert ''.join(first) == want[0]
  assert [e[0] for e in errors] == ['zz_not_video.mp4']

  out = io.StringIO()
  predict.answer_videos(setup['predictor'], paths[:1], QUESTION, FRAMES, as_json=True, out=out)
  assert json.loads(out.getvalue()) == {'video': paths[0], 'question': QUESTION,
                                        'answer': _direct(setup, paths[0])}


def test_text_stream_writes_each_token_as_it_comes(setup):  # noqa: F811
  """TextStream writes what each new token adds to the text, stops at EOS, and starts over."""
  tok = setup['predictor'].tokenizer
  words = 'the red square moves to the left'
  ids = tok(words, add_special_tokens=False)['input_ids']
  assert len(ids) >= 4
  out = io.StringIO()
  stream = predict.TextStream(tok, tok.eos_token_id, out)
  pieces = []
  for step, i in enumerate(ids + [tok.eos_token_id] + ids[:1]):
    before = out.getvalue()
    stream(step, np.array([i]))
    pieces.append(out.getvalue()[len(before):])
  whole = tok.decode(ids, skip_special_tokens=True).lstrip()
  assert out.getvalue() == whole and ''.join(pieces) == whole
  assert sum(bool(p) for p in pieces[:len(ids)]) >= len(ids) - 1 and not any(pieces[len(ids):])
  stream.start()
  stream(0, np.array([ids[0]]))
  assert out.getvalue() == whole + tok.decode(ids[:1], skip_special_tokens=True).lstrip()


def test_tokenizer_resolution(setup, tmp_path):  # noqa: F811
  assert predict.resolve_tokenizer(str(tmp_path), 'tok') == 'tok'
  tok = str(setup['work'] / 'tok')
  assert predict.resolve_tokenizer(tok, None) == tok
  (tmp_path / 'config.json').write_text(json.dumps({'data': {'tokenizer': '/x/tok'}}))
  assert predict.resolve_tokenizer(str(tmp_path), None) == '/x/tok'
  with pytest.raises(ValueError, match='pass --tokenizer'):
    predict.resolve_tokenizer(str(setup['converted']), None)
  # A workdir's config.json that cannot be read is an error naming it, not "no tokenizer".
  for broken in ('{"data": {"tokenizer": ', '["data"]', '{"data": "tok"}'):
    (tmp_path / 'config.json').write_text(broken)
    with pytest.raises(ValueError, match='config.json'):
      predict.resolve_tokenizer(str(tmp_path), None)


def _cli(setup, *extra, checkpoint=None):  # noqa: F811
  """predict on the converted tiny model (or `checkpoint`, then with no --tokenizer)."""
  env = subprocess_env()      # one device and this session's compilation cache
  model = [f'--checkpoint={checkpoint}'] if checkpoint else [
      f'--checkpoint={setup["converted"]}', f'--tokenizer={setup["work"] / "tok"}']
  args = [sys.executable, '-m', 'panda_jax.predict', *model, f'--question={QUESTION}',
          f'--frames={FRAMES}', '--max_new_tokens=6', *extra]
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_line(setup, videos, tmp_path, gcs_bucket):  # noqa: F811
  paths, _ = predict.list_videos(str(videos))
  run = _cli(setup, f'--video={videos}', '--json')
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [json.loads(l) for l in run.stdout.splitlines()]
  assert rows == [{'video': p, 'question': QUESTION, 'answer': _direct(setup, p)}
                  for p in paths[:2]]
  errors = [l for l in run.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 2
  assert errors[0].startswith(f'error: {videos / "notes.txt"}: not a video file')
  assert errors[1].startswith(f'error: {videos / "zz_not_video.mp4"}: ')

  # The converted model in a bucket, its tokenizer files beside it (found there).
  from panda_jax import storage
  storage.upload_tree(str(setup['converted']), f'{gcs_bucket}/model')
  storage.upload_tree(str(setup['work'] / 'tok'), f'{gcs_bucket}/model')
  one = _cli(setup, f'--video={paths[0]}', checkpoint=f'{gcs_bucket}/model')
  assert one.returncode == 0, one.stderr[-3000:]
  assert one.stdout == _direct(setup, paths[0]) + '\n'

  missing = _cli(setup, f'--video={tmp_path / "nope.mp4"}')
  assert missing.returncode == 1
  assert f'error: {tmp_path / "nope.mp4"}: no such file or directory' in missing.stderr
  bad = _cli(setup, f'--video={videos / "zz_not_video.mp4"}')
  assert bad.returncode == 1 and 'error: ' in bad.stderr and not bad.stdout
