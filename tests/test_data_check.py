"""VideoQA sources (qa.py) and the data set check (check.py) on synthetic and broken videos."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from panda_jax import config as config_lib
from panda_jax.data import check, pipeline, qa, synthetic, text
from panda_jax.data.pipeline import AnnotationError
from panda_jax.data.video import VideoDecodeError, decode_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 4
MAX_LEN = 400
STAB = config_lib.stab_config(config_lib.model_config('tiny'))   # what --model_size=tiny uses
LONG_ANSWER = 'The red square moves to the left and then it stops. ' * 40


def _write(path, data):
  with open(path, 'w') as f:
    json.dump(data, f)
  return str(path)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """6 synthetic clips (4 train, 2 held out), a portrait and a square clip, the broken files,
  a tokenizer, and a training file mixing good, broken, missing and unusable samples."""
  root = str(tmp_path_factory.mktemp('check'))
  ds = synthetic.make_dataset(root, 6, width=64, height=48, fps=8, duration_s=1.0)
  rng = np.random.default_rng(0)
  for name, w, h, seconds in (('portrait', 48, 64, 1.5), ('square', 48, 48, 0.375)):
    # A short travel: the default (0.6) cannot end a shape in a given half of so small a frame.
    scene = synthetic.random_scene(rng, width=w, height=h, fps=8, duration_s=seconds,
                                   travel=0.3)
    synthetic.write_scene_video(os.path.join(root, 'videos', name + '.mp4'), scene)
  broken = synthetic.write_broken_files(os.path.join(root, 'videos', 'broken'))
  captions = json.load(open(ds.train_captions))
  instruct = json.load(open(ds.train_instruct))
  corpus = [m['value'].replace('<video>', '') for e in captions + instruct
            for m in e['conversations']] + [text.SYSTEM_PROMPT, 'USER: ASSISTANT:', LONG_ANSWER]
  tok = text.build_tokenizer(os.path.join(root, 'tokenizer'), corpus * 2)

  def conv(video, answer='A shape moves.', question='<video>\nWhat happens?', id_=None):
    return {'id': id_ or video, 'video': video, 'conversations': [
        {'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]}

  entries = list(captions)                                                  # 0-3
  entries += [conv('videos/portrait.mp4'), conv('videos/square.mp4')]       # 4, 5
  entries += [conv(os.path.relpath(p, root)) for p in broken.values()]      # 6-12
  entries += [conv('videos/nope.mp4')]                                      # 13 missing
  entries += [dict(instruct[0], id='again')]                                # 14 same video as 0
  entries += [conv(captions[1]['video'], question='What happens?', id_='no_placeholder')]
  entries += [conv(captions[2]['video'], answer=LONG_ANSWER, id_='long')]   # 16
  assert entries[14]['video'] == entries[0]['video']
  ann = _write(os.path.join(root, 'mixed.json'), entries)
  result = check.check(ann, root, tokenizer=tok, frames=FRAMES, max_len=MAX_LEN, stab=STAB,
                       progress=False)
  return dict(root=root, ds=ds, broken=broken, tok=tok, ann=ann, entries=entries,
              result=result)


# ------------------------------------------------------------------------------------------
# qa.py

def test_synthetic_qa_records(data):
  ds = data['ds']
  raw = json.load(open(ds.eval_qa))
  entries = qa.load_qa(ds.eval_qa)
  assert entries == raw and len(entries) > 2
  videos = os.path.join(ds.root, 'videos')
  records = qa.qa_records(entries, videos)
  assert [r['question_id'] for r in records] == [q['question_id'] for q in raw]
  for r, q in zip(records, raw):
    assert r['video'] == q['video_name'] + '.mp4'
    assert os.path.join(videos, r['video']) in ds.eval_videos
    assert (r['question'], r['answer'], r['type']) == (q['question'], q['answer'], q['type'])
    assert qa.resolve_video(videos, q['video_name']) == os.path.join(videos, r['video'])
  conv = qa.as_conversation(records[0])
  assert conv == [{'from': 'human', 'value': '<video>\n' + raw[0]['question']},
                  {'from': 'gpt', 'value': raw[0]['answer']}]
  # Trainable: the training loader accepts it and the template tokenizes it.
  path = _write(os.path.join(data['root'], 'qa_train.json'),
                [qa.as_training_record(r) for r in records])
  loaded = pipeline.load_annotations(path)
  assert loaded[0]['video'] == records[0]['video'] and loaded[0]['id'] == raw[0]['question_id']
  tok = text.load_tokenizer(data['tok'])
  ids, labels = text.tokenize_conversation(tok, loaded[0]['conversations'], num_frames=FRAMES)
  assert (ids == text.IMAGE_TOKEN_INDEX).sum() == FRAMES
  learned = tok.decode(ids[labels != text.IGNORE_INDEX])
  assert learned.startswith(raw[0]['answer'])
  with pytest.raises(ValueError, match="question 'q9'.*'ghost'"):
    qa.as_training_record({'question_id': 'q9', 'video_name': 'ghost', 'video': None,
                           'question': 'Q?', 'answer': 'A'})


def test_resolve_video(tmp_path):
  for name in ('abc.mkv', 'v_YT123.webm', 'exact.mp4', 'both.mp4', 'both.avi', 'pref.gif',
               'v_pref.mp4', 'sub/v_YT9.mov', 'clip.avi'):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b'x')
  (tmp_path / 'dir.mp4').mkdir()
  root = str(tmp_path)
  want = {'abc': 'abc.mkv', 'YT123': 'v_YT123.webm', 'exact.mp4': 'exact.mp4',
          'both': 'both.mp4',          # extension order: .mp4 before .avi
          'pref': 'pref.gif',          # the name as given before the 'v_' prefix
          'sub/YT9': 'sub/v_YT9.mov', 'clip': 'clip.avi', 'v_YT123': 'v_YT123.webm'}
  for name, rel in want.items():
    assert qa.resolve_video(root, name) == os.path.join(root, rel), name
  for name in ('nothing', 'dir', 'abc.mp4', 'ABC'):
    assert qa.resolve_video(root, name) is None, name
  records = qa.qa_records([{'video_name': 'YT123', 'question': 'q', 'question_id': 1,
                            'answer': 'a'},
                           {'video_name': 'gone', 'question': 'q', 'question_id': 2,
                            'answer': 'a'}], root)
  assert [r['video'] for r in records] == ['v_YT123.webm', None]
  assert [r['type'] for r in records] == [None, None]


GOOD = {'video_name': 'a', 'question': 'Is it red?', 'question_id': 'a_0', 'answer': 'yes'}


@pytest.mark.parametrize('content,where,field', [
    ('not json', None, None),
    ({'video_name': 'a'}, None, 'list'),
    ([GOOD, 'text'], 'entry 1', 'object'),
    ([GOOD, dict(GOOD, question_id='a_1', video_name='')], 'entry 1', '"video_name"'),
    ([dict(GOOD, question=7)], 'entry 0', '"question"'),
    ([GOOD, dict(GOOD, question_id=True)], 'entry 1', '"question_id"'),
    ([GOOD, GOOD], 'entry 1', '"question_id"'),                    # repeated id
    ([GOOD, dict(GOOD, question_id='a_1', answer=3)], 'entry 1', '"answer"'),
    ([dict(GOOD, answer='  ')], 'entry 0', '"answer"'),
    ([{k: v for k, v in GOOD.items() if k != 'answer'}], 'entry 0', 'test_a.json'),
])
def test_load_qa_rejects_malformed_files(tmp_path, content, where, field):
  path = str(tmp_path / 'qa.json')
  with open(path, 'w') as f:
    f.write(content if isinstance(content, str) else json.dumps(content))
  with pytest.raises(AnnotationError) as e:
    qa.load_qa(path)
  msg = str(e.value)
  assert msg.startswith(path)
  if where:
    assert where in msg, msg
  if field:
    assert field in msg, msg


def test_load_qa_with_an_answers_file(tmp_path):
  questions = [{'video_name': 'x', 'question': 'Q0?', 'question_id': 'x_0'},
               {'video_name': 'y', 'question': 'Q1?', 'question_id': 'y_0'}]
  answers = [{'answer': 'no', 'type': 3, 'question_id': 'x_0'},
             {'answer': 'two', 'type': 5, 'question_id': 'y_0'}]
  q = _write(tmp_path / 'test_q.json', questions)
  a = _write(tmp_path / 'test_a.json', answers)
  got = qa.load_qa(q, answers_path=a)
  assert [(e['question_id'], e['answer'], e['type']) for e in got] == [('x_0', 'no', 3),
                                                                       ('y_0', 'two', 5)]
  swapped = _write(tmp_path / 'swapped.json', answers[::-1])
  with pytest.raises(AnnotationError, match=r'swapped.json: entry 0: field "question_id" is '
                                            r"'y_0' but question 0 .* is 'x_0'"):
    qa.load_qa(q, answers_path=swapped)
  short = _write(tmp_path / 'short.json', answers[:1])
  with pytest.raises(AnnotationError, match='1 answers for the 2 questions'):
    qa.load_qa(q, answers_path=short)
  bad = _write(tmp_path / 'bad.json', [answers[0], {'question_id': 'y_0', 'answer': 5}])
  with pytest.raises(AnnotationError, match=r'bad.json: entry 1 .*field "answer"'):
    qa.load_qa(q, answers_path=bad)


# ------------------------------------------------------------------------------------------
# check.py

def _expected_lengths(data):
  """Assembled lengths of the samples whose video and conversation are usable, through the
  training pipeline's own processing and layout (the number of valid sequence positions)."""
  proc = pipeline.ProcessSample(data['root'], data['tok'], STAB, FRAMES, 4096)
  out = {}
  for i, e in enumerate(data['entries']):
    s = proc(e)
    if 'skip' not in s:
      out[i] = int(pipeline.collate([s], STAB, 4096)['valid'].sum())
  return out


def test_check_counts_reasons_and_statistics(data):
  r = data['result']
  root, broken = data['root'], data['broken']
  assert r['format'] == 'conversation'
  assert r['videos'] == {'total': 14, 'good': 6, 'missing': 1, 'unreadable': 7}
  assert r['samples'] == {'total': 17, 'good': 9, 'missing': 1, 'unreadable': 7,
                          'bad_conversation': 1, 'too_long': 1, 'usable': 7}
  # Every broken file is unreadable with the decoder's own reason, the missing one missing.
  problems = {p['path']: p for p in r['problems']}
  assert set(problems) == set(broken.values()) | {os.path.join(root, 'videos/nope.mp4')}
  reasons = {}
  for case, path in broken.items():
    with pytest.raises(VideoDecodeError) as e:
      decode_frames(path, num=FRAMES)
    reasons[path] = e.value.reason
    assert problems[path]['status'] == 'unreadable'
    assert problems[path]['reason'] == e.value.reason, case
    assert problems[path]['entries'] == [6 + list(broken).index(case)]
  assert problems[os.path.join(root, 'videos/nope.mp4')]['status'] == 'missing'
  assert problems[os.path.join(root, 'videos/nope.mp4')]['entries'] == [13]
  assert r['unreadable_reasons'] == dict(collections.Counter(
      x.split(':')[0] for x in reasons.values()))
  assert r['unreadable_reasons']['empty file (0 bytes)'] == 1
  assert r['unreadable_reasons']['no video stream'] == 1
  # Frames: four 8-frame clips, a 12-frame portrait clip, a 3-frame square clip.
  assert {k: r['frames'][k] for k in ('count', 'min', 'median', 'max')} == {
      'count': 6, 'min': 3, 'median': 8, 'max': 12}
  assert r['shorter_than_frames'] == 1
  assert (r['duration_s']['min'], r['duration_s']['max']) == (0.38, 1.5)
  assert r['aspect'] == {'landscape': 4, 'portrait': 1, 'square': 1}
  assert r['resolutions'][0] == ['64x48', 4] or r['resolutions'][0] == ('64x48', 4)
  # Lengths: the same numbers the training pipeline lays out; only the long one is over.
  lengths = _expected_lengths(data)
  assert sorted(lengths) == [0, 1, 2, 3, 4, 5, 14, 16]
  assert max(v for i, v in lengths.items() if i != 16) <= MAX_LEN < lengths[16]
  assert r['too_long'] == [{'index': 16, 'id': 'long', 'video': data['entries'][16]['video'],
                            'length': lengths[16]}]
  assert r['tokens']['count'] == 8
  assert (r['tokens']['min'], r['tokens']['max']) == (min(lengths.values()), lengths[16])
  assert r['tokens']['median'] == float(np.median(list(lengths.values())))
  assert [(b['index'], b['id']) for b in r['bad_conversations']] == [(15, 'no_placeholder')]
  assert 'placeholder' in r['bad_conversations'][0]['detail']
  # The pipeline agrees on what is unusable.
  proc = pipeline.ProcessSample(root, data['tok'], STAB, FRAMES, MAX_LEN)
  skips = collections.Counter(proc(e).get('skip') for e in data['entries'])
  assert skips == {None: r['samples']['usable'], 'bad_video': 8, 'bad_conversation': 1,
                   'too_long': 1}
  # The report on disk (default path) holds the same.
  assert r['report'] == data['ann'] + '.check.json'
  assert json.load(open(r['report'])) == json.loads(json.dumps(r))
  text_out = check.summary(r)
  assert 'videos:  good 6  missing 1  unreadable 7' in text_out
  assert f'1 over max_len={MAX_LEN}' in text_out


def test_a_bug_stops_the_check_instead_of_being_reported(data, tmp_path, monkeypatch):
  """Only a file's own failures (VideoDecodeError) are 'unreadable', and only a
  ConversationError is a bad conversation: an error of our code (a TypeError in the colour
  conversion, a plain ValueError while tokenising) comes out of `check` with its traceback, as
  it would stop training."""
  from panda_jax.data import video
  entries = [data['entries'][0], data['entries'][15]]    # good; no placeholder
  ann = _write(tmp_path / 'two.json', entries)
  kwargs = dict(tokenizer=data['tok'], frames=FRAMES, max_len=MAX_LEN, stab=STAB,
                report=None, progress=False)
  r = check.check(ann, data['root'], **kwargs)
  assert r['samples']['good'] == 2 and r['samples']['bad_conversation'] == 1
  assert r['samples']['usable'] == 1

  def bug(*args, **kwargs):
    raise TypeError('injected bug')
  with monkeypatch.context() as m:
    m.setattr(video, '_to_rgb', bug)
    with pytest.raises(TypeError, match='injected bug'):
      check.probe_video(os.path.join(data['root'], entries[0]['video']), FRAMES, STAB, 30.0)
    with pytest.raises(TypeError, match='injected bug'):
      check.check(ann, data['root'], **kwargs)

  def value_bug(*args, **kwargs):
    raise ValueError('injected bug')
  with monkeypatch.context() as m:
    m.setattr(text, 'tokenizer_image_token', value_bug)
    with pytest.raises(ValueError, match='injected bug'):
      check.check(ann, data['root'], **kwargs)


def test_check_a_qa_file(data, tmp_path):
  ds = data['ds']
  questions = json.load(open(ds.eval_qa))
  ghost = {'video_name': 'ghost', 'question': 'Is it there?', 'question_id': 'ghost_0',
           'answer': 'no'}
  path = _write(tmp_path / 'qa.json', questions + [ghost])
  videos = os.path.join(ds.root, 'videos')
  r = check.check(path, videos, frames=FRAMES, stab=STAB, report=None, progress=False)
  assert r['format'] == 'qa' and r['report'] is None
  assert not os.path.exists(path + '.check.json')
  assert r['videos'] == {'total': 3, 'good': 2, 'missing': 1, 'unreadable': 0}
  n = len(questions)
  assert r['samples'] == {'total': n + 1, 'good': n, 'missing': 1, 'unreadable': 0,
                          'bad_conversation': 0, 'too_long': 0, 'usable': n}
  (p,) = r['problems']
  assert p['status'] == 'missing' and p['entries'] == [n]
  assert "'ghost'" in p['reason'] and "'v_'" in p['reason']
  assert r['tokens'] is None
  assert 'not computed' in check.summary(r)
  # The reference's split files: questions, and answers paired by position.
  q = _write(tmp_path / 'test_q.json', [{k: e[k] for k in ('video_name', 'question',
                                                            'question_id')} for e in questions])
  a = _write(tmp_path / 'test_a.json', [{'answer': e['answer'], 'question_id': e['question_id']}
                                        for e in questions])
  split = check.check(q, videos, frames=FRAMES, stab=STAB, report=None, progress=False,
                      answers=a)
  assert split['samples'] == dict(r['samples'], total=n, missing=0)
  with pytest.raises(AnnotationError, match='field "answer" is missing.*test_a.json'):
    check.check(q, videos, report=None, progress=False)
  with pytest.raises(AnnotationError, match='only goes with a VideoQA questions file'):
    check.check(data['ann'], data['root'], report=None, progress=False, answers=a)
  # A malformed QA file stops the check; so do unknown and empty files.
  dup = _write(tmp_path / 'dup.json', questions + [questions[0]])
  with pytest.raises(AnnotationError, match=f'entry {n}: field "question_id"'):
    check.check(dup, videos, frames=FRAMES, stab=STAB, report=None, progress=False)
  for content, msg in (([{'clip': 'a'}], r"keys \['clip'\]"), ([], 'no samples')):
    bad = _write(tmp_path / 'bad.json', content)
    with pytest.raises(AnnotationError, match=msg):
      check.check(bad, videos, report=None, progress=False)
  with pytest.raises(ValueError, match='frames=6'):
    check.check(path, videos, frames=6, report=None, progress=False)
  with pytest.raises(ValueError, match='is not a directory'):
    check.check(path, str(tmp_path / 'nowhere'), report=None, progress=False)


def _cli(*args):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'panda_jax.data.check', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_command_line_with_workers(data, tmp_path):
  report = str(tmp_path / 'report.json')
  run = _cli(f'--annotations={data["ann"]}', f'--video_root={data["root"]}',
             f'--tokenizer={data["tok"]}', f'--frames={FRAMES}', f'--max_len={MAX_LEN}',
             '--model_size=tiny', '--workers=2', f'--report={report}')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'videos:  good 6  missing 1  unreadable 7' in run.stdout
  assert ('samples: good 9  missing 1  unreadable 7  bad_conversation 1  too_long 1  '
          'usable 7') in run.stdout
  assert 'videos: 100%' in run.stderr            # the progress bar goes to stderr
  got = json.load(open(report))
  want = json.loads(json.dumps(data['result']))
  assert got['report'] == report and got['settings']['image_size'] == STAB.image_size
  for key in ('report', 'settings'):
    got.pop(key), want.pop(key)
  assert got == want                              # 2 worker processes == this process


def test_command_line_a_bug_is_a_traceback_not_an_error_line(data, tmp_path):
  """Exit status 2 and one 'error:' line are for a check that cannot start; a ValueError of our
  code while tokenising, once the check runs, comes out as a traceback."""
  ann = _write(tmp_path / 'one.json', [data['entries'][0]])
  code = ('import sys\n'
          'from absl import app\n'
          'from panda_jax.data import check, text\n'
          'def bug(*args, **kwargs):\n'
          '  raise ValueError("injected bug")\n'
          'text.tokenizer_image_token = bug\n'
          'check._define_flags()\n'
          'app.run(check.main, argv=sys.argv)\n')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, '-c', code, f'--annotations={ann}',
                        f'--video_root={data["root"]}', f'--tokenizer={data["tok"]}',
                        f'--frames={FRAMES}', '--model_size=tiny', '--report='],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
  assert 'Traceback' in run.stderr and 'ValueError: injected bug' in run.stderr
  assert 'error: injected bug' not in run.stderr


def test_command_line_malformed_annotations(data, tmp_path):
  entries = [data['entries'][0], {'id': 'x', 'video': 'videos/vid_00000.mp4'}]
  ann = _write(tmp_path / 'bad.json', entries)
  run = _cli(f'--annotations={ann}', f'--video_root={data["root"]}')
  assert run.returncode == 2
  assert f'{ann}: entry 1' in run.stderr and '"conversations"' in run.stderr
  assert 'videos:' not in run.stdout
  assert not os.path.exists(ann + '.check.json')
