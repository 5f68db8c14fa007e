"""VideoQA inference over a benchmark file: every question answered in the reference's output
format, missing videos listed, resume after an interruption, models from both sources."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from panda_jax import config as config_lib
from panda_jax.convert import checkpoint as conv
from panda_jax.data import qa, synthetic, text
from panda_jax.data.assembly import layout_batch
from panda_jax.eval import videoqa
from panda_jax.eval.generate import Sampling
from panda_jax.eval.predict import Predictor
from panda_jax.models.panda import VideoPanda

FRAMES = 4
BATCH = 4


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  work = tmp_path_factory.mktemp('videoqa')
  ds = synthetic.make_dataset(str(work / 'syn'), 6, seed=1, eval_fraction=0.5)
  entries = json.load(open(ds.eval_qa))
  corpus = [e['question'] for e in entries] + [e['answer'] for e in entries]
  tok_dir = str(work / 'tok')
  text.build_tokenizer(tok_dir, (corpus + [text.SYSTEM_PROMPT, 'USER: ASSISTANT:']) * 3)
  questions = work / 'test_q.json'
  entries.append(dict(entries[0], video_name='not_there', question_id='q_missing'))
  json.dump(entries, open(questions, 'w'))

  cfg = config_lib.panda_config(config_lib.model_config('tiny'))
  model = VideoPanda(cfg)
  s = cfg.stab.image_size
  mask = np.ones((1, FRAMES, s, s), np.float32)
  ids = np.array([[1] + [text.IMAGE_TOKEN_INDEX] * FRAMES + [5]])
  lay = layout_batch(ids, None, np.ones_like(ids), mask, cfg.stab, max_len=160)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()}, mask=jnp.asarray(mask),
               pixels=jnp.zeros((1, FRAMES, s, s, 3)))
  variables = nn.unbox(jax.jit(model.init, static_argnames=('with_distill',))(
      jax.random.PRNGKey(0), batch, with_distill=False))
  variables = jax.tree.map(np.asarray, variables)
  converted = work / 'converted'
  converted.mkdir()
  json.dump(conv.config_to_json('video_panda', cfg), open(converted / conv.CONFIG_FILE, 'w'))
  ocp.StandardCheckpointer().save((converted / 'variables').absolute(), variables)
  tok = text.load_tokenizer(tok_dir)
  predictor = Predictor(cfg, variables, tok, Sampling(max_new_tokens=6, eos_id=tok.eos_token_id))
  records = qa.qa_records(qa.load_qa(str(questions)), os.path.join(ds.root, 'videos'))
  return {'ds': ds, 'records': records, 'predictor': predictor, 'converted': converted,
          'variables': variables, 'cfg': cfg, 'work': work,
          'video_root': os.path.join(ds.root, 'videos')}


def _lines(path):
  return [json.loads(l) for l in open(path)]


@pytest.fixture(scope='module')
def first_run(setup):
  out = str(setup['work'] / 'preds.json')
  stats = videoqa.answer_file(setup['predictor'], setup['records'], setup['video_root'], out,
                              batch_size=BATCH, frames=FRAMES, progress=False)
  return out, stats


def test_every_question_is_answered_in_the_reference_format(setup, first_run):
  out, stats = first_run
  n = len(setup['records'])
  assert stats == {'questions': n, 'already': 0, 'answered': n - 1, 'failed': 1,
                   'complete': True}
  rows = _lines(out)
  want = [r for r in setup['records'] if r['question_id'] != 'q_missing']
  assert sorted(r['id'] for r in rows) == sorted(r['question_id'] for r in want)
  by_id = {r['question_id']: r for r in want}
  for row in rows:
    assert set(row) == {'id', 'question', 'answer', 'pred', 'type'} - (
        set() if 'type' in row else {'type'})
    assert (row['question'], row['answer']) == (by_id[row['id']]['question'],
                                                by_id[row['id']]['answer'])
    assert isinstance(row['pred'], str)
  failures = json.load(open(out + '.failures.json'))
  assert [f['id'] for f in failures] == ['q_missing'] and 'not_there' in failures[0]['reason']
  # The prediction is the model's answer to that question about that video.
  from panda_jax.data.video import load_video
  r = want[0]
  v = load_video(os.path.join(setup['video_root'], r['video']), num=FRAMES, size=112,
                 teacher_size=56, patch=14)
  direct = setup['predictor'].answer(np.stack([v['pixels']] * BATCH),
                                     np.stack([v['mask']] * BATCH), [r['question']] * BATCH)
  assert {row['id']: row['pred'] for row in rows}[r['question_id']] == direct[0]


def test_an_interrupted_run_resumes_without_asking_twice(setup, first_run, tmp_path):
  out, _ = first_run
  rows = open(out).read().splitlines(keepends=True)
  part = str(tmp_path / 'preds.json')
  with open(part, 'w') as f:
    f.writelines(rows[:2])
    f.write(rows[2][:10])                    # a line torn by the kill
  stats = videoqa.answer_file(setup['predictor'], setup['records'], setup['video_root'], part,
                              batch_size=BATCH, frames=FRAMES, progress=False)
  n = len(setup['records'])
  assert stats == {'questions': n, 'already': 2, 'answered': n - 3, 'failed': 1,
                   'complete': True}
  again = _lines(part)
  assert len(again) == len({r['id'] for r in again}) == n - 1
  assert {r['id']: r['pred'] for r in again} == {r['id']: r['pred'] for r in _lines(out)}


def test_models_load_from_converted_checkpoints_and_training_workdirs(setup, tmp_path):
  cfg, v = videoqa.load_model(str(setup['converted']))
  assert cfg == setup['cfg']
  jax.tree.map(np.testing.assert_array_equal, v['params'], setup['variables']['params'])
  # A training workdir: the resolved config and an Orbax checkpoint of the train state.
  from panda_jax.train import checkpoint as ckpt
  from panda_jax.train.step import TrainState
  c = config_lib.train_config(3, 'tiny')
  work = tmp_path / 'run'
  config_lib.save_resolved(c, str(work))
  mngr = ckpt.manager(str(work), 1, 1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=setup['variables']['params'],
                     batch_stats=setup['variables']['batch_stats'], opt_state={'mu': jnp.zeros(2)},
                     rng=jax.random.PRNGKey(0), refused=jnp.zeros((), jnp.int32))
  ckpt.save(mngr, 3, state, {})
  mngr.wait_until_finished()
  cfg2, v2 = videoqa.load_model(str(work))
  assert cfg2 == setup['cfg']
  jax.tree.map(np.testing.assert_array_equal, v2['params'], setup['variables']['params'])
  with pytest.raises(FileNotFoundError, match='neither a converted checkpoint'):
    videoqa.load_model(str(tmp_path))


def test_command_line(setup, first_run, consistency_file, tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'cli.json'
  from conftest import subprocess_env
  env = subprocess_env()
  args = [sys.executable, '-m', 'panda_jax.eval.videoqa', f'--checkpoint={setup["converted"]}',
          f'--tokenizer={setup["work"] / "tok"}', f'--questions={setup["work"] / "test_q.json"}',
          f'--video_root={setup["video_root"]}', f'--out={out}', f'--batch_size={BATCH}',
          f'--frames={FRAMES}', '--max_new_tokens=6']
  # The malformed-file run is independent: started alongside (it spends its time importing).
  bad_args = args[:5] + [f'--questions={setup["converted"] / conv.CONFIG_FILE}'] + args[6:]
  # A consistency file through the same command (format told by its fields), decoded inline.
  pairs_out = tmp_path / 'pairs.jsonl'
  pair_args = (args[:5] + [f'--questions={consistency_file[0]}', args[6], f'--out={pairs_out}']
               + args[8:] + ['--decode_workers=0'])
  procs = [subprocess.Popen(a, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for a in (args, bad_args, pair_args)]
  outs = [p.communicate(timeout=600) for p in procs]
  run, bad, pairs = [subprocess.CompletedProcess(p.args, p.returncode, *o)
                     for p, o in zip(procs, outs)]
  assert pairs.returncode == 0, pairs.stderr[-3000:]
  assert '5 question pairs, 4 answered now, 0 already there, 1 without a usable video' \
      in pairs.stdout
  assert all(isinstance(r['pred1'], str) and isinstance(r['pred2'], str)
             for r in _lines(pairs_out)) and len(_lines(pairs_out)) == 4
  assert run.returncode == 0, run.stderr[-3000:]
  n = len(setup['records'])
  assert f'{n} questions, {n - 1} answered now, 0 already there, 1 without a usable video' \
      in run.stdout
  assert {r['id']: r['pred'] for r in _lines(out)} == \
      {r['id']: r['pred'] for r in _lines(first_run[0])}
  assert bad.returncode == 2 and 'expected a JSON list' in bad.stderr


# --- Background decoding, corrupt videos, the fine-grained benchmark's files ------------------

class FakePredictor:
  """Answers with the question and a checksum of the frames it was given, so a line shows
  which question was asked about which video; records the batch sizes it saw."""

  def __init__(self, cfg):
    self.cfg = cfg
    self.batches = []

  def answer(self, pixels, mask, questions):
    self.batches.append(len(questions))
    assert np.shape(pixels)[0] == np.shape(mask)[0] == len(questions)
    return [f'{q} @ {checksum(p)}' for p, q in zip(pixels, questions)]


def checksum(pixels):
  return f'{float(np.abs(np.asarray(pixels, np.float64)).sum()):.3f}'


def _clip_sums(setup, names):
  out = {}
  for name in names:
    path = qa.resolve_video(setup['video_root'], name)
    out[name] = checksum(videoqa.load_clip(path, setup['cfg'].stab, FRAMES)['pixels'])
  return out


def test_decoding_runs_ahead_in_background_keeping_order():
  import threading
  import time
  lock = threading.Lock()
  state = {'running': 0, 'most': 0, 'started': [], 'consumed': 0, 'ahead': 0}

  def load(i):
    with lock:
      state['running'] += 1
      state['most'] = max(state['most'], state['running'])
      state['started'].append(i)
      state['ahead'] = max(state['ahead'], len(state['started']) - state['consumed'])
    time.sleep(0.05 * (i % 3))             # later videos often finish first
    with lock:
      state['running'] -= 1
    return ({'i': i}, None) if i != 4 else (None, 'corrupt')

  got = []
  for g, clip, reason in videoqa._decode_videos(list(range(12)), load, workers=3):
    got.append((g, clip, reason))
    state['consumed'] += 1
  assert [g for g, _, _ in got] == list(range(12))
  assert all(c == {'i': g} for g, c, r in got if g != 4) and got[4][1:] == (None, 'corrupt')
  assert state['most'] > 1                 # decodes overlapped
  assert state['ahead'] <= 2 * 3 + 1       # bounded: at most 2 * workers queued ahead
  inline = [(g, c, r) for g, c, r in videoqa._decode_videos(list(range(12)), load, workers=0)]
  assert inline == got


def test_background_decoding_gives_the_same_predictions(setup, first_run, tmp_path):
  fake = FakePredictor(setup['cfg'])
  outs = {}
  for workers in (0, 3):
    outs[workers] = str(tmp_path / f'w{workers}.json')
    videoqa.answer_file(fake, setup['records'], setup['video_root'], outs[workers],
                        batch_size=BATCH, frames=FRAMES, progress=False, workers=workers)
  assert open(outs[0]).read() == open(outs[3]).read()     # same lines, same order
  rows = _lines(outs[3])
  sums = _clip_sums(setup, {r['video_name'] for r in setup['records'] if r['video']})
  by_id = {r['question_id']: r for r in setup['records']}
  for row in rows:
    r = by_id[row['id']]
    assert row['pred'] == f'{r["question"]} @ {sums[r["video_name"]]}'
  assert set(fake.batches) == {BATCH}
  # The real model: the background-decoded first run equals an inline one.
  inline = str(tmp_path / 'inline.json')
  videoqa.answer_file(setup['predictor'], setup['records'], setup['video_root'], inline,
                      batch_size=BATCH, frames=FRAMES, progress=False, workers=0)
  assert [(r['id'], r['pred']) for r in _lines(inline)] == \
      [(r['id'], r['pred']) for r in _lines(first_run[0])]


def test_a_corrupt_video_is_counted_not_a_crash(setup, tmp_path):
  root = tmp_path / 'videos'
  root.mkdir()
  good = sorted({r['video'] for r in setup['records'] if r['video']})
  for name in good:
    os.symlink(os.path.join(setup['video_root'], name), root / name)
  (root / 'broken.mp4').write_bytes(np.random.default_rng(0).bytes(5000))
  (root / 'empty.mp4').write_bytes(b'')
  entries = [{'video_name': os.path.splitext(good[0])[0], 'question': 'q0', 'question_id': 0,
              'answer': 'a'},
             {'video_name': 'broken', 'question': 'q1', 'question_id': 1, 'answer': 'a'},
             {'video_name': 'broken', 'question': 'q2', 'question_id': 2, 'answer': 'a'},
             {'video_name': 'empty', 'question': 'q3', 'question_id': 3, 'answer': 'a'},
             {'video_name': os.path.splitext(good[1])[0], 'question': 'q4', 'question_id': 4,
              'answer': 'a'}]
  records = qa.qa_records(entries, str(root))
  out = str(tmp_path / 'p.json')
  stats = videoqa.answer_file(FakePredictor(setup['cfg']), records, str(root), out,
                              batch_size=BATCH, frames=FRAMES, progress=False, workers=2)
  assert stats == {'questions': 5, 'already': 0, 'answered': 2, 'failed': 3,
                   'complete': True}
  assert [r['id'] for r in _lines(out)] == [0, 4]
  failures = {f['id']: f['reason'] for f in json.load(open(out + '.failures.json'))}
  assert sorted(failures) == [1, 2, 3]
  assert failures[1] == failures[2] and 'broken.mp4' in failures[1]
  assert 'empty file' in failures[3]
  with pytest.raises(ValueError, match='frames=6 must be a positive multiple of 4'):
    videoqa.answer_file(FakePredictor(setup['cfg']), records, str(root), out, frames=6)


@pytest.fixture(scope='module')
def consistency_file(setup):
  names = sorted({r['video_name'] for r in setup['records'] if r['video']})
  qs = [r['question'] for r in setup['records']]
  entries = [{'video_name': names[0], 'Q1': qs[0], 'Q2': qs[1], 'A': 'left'},
             {'video_name': names[0], 'Q1': qs[2], 'Q2': qs[3], 'A': 'yes'},
             {'video_name': names[1], 'Q1': qs[4], 'Q2': qs[5], 'A': 'right'},
             {'video_name': 'not_there', 'Q1': qs[0], 'Q2': qs[1], 'A': 'up'},
             {'video_name': names[2], 'Q1': qs[6], 'Q2': qs[7], 'A': 'down'}]
  path = setup['work'] / 'consistency_qa.json'
  json.dump(entries, open(path, 'w'))
  return str(path), entries


def test_consistency_pairs_get_both_answers(setup, consistency_file, tmp_path):
  path, entries = consistency_file
  kind, records = videoqa.load_records(path, None, setup['video_root'])
  assert kind == 'consistency' and len(records) == 5
  assert [r['question_id'] for r in records] == [
      f'{entries[0]["video_name"]}_0', f'{entries[0]["video_name"]}_1',
      f'{entries[2]["video_name"]}_0', 'not_there_0', f'{entries[4]["video_name"]}_0']
  # Batches of 3: pairs straddle batches; each line is written once both answers exist.
  fake = FakePredictor(setup['cfg'])
  out = str(tmp_path / 'consistency.jsonl')
  stats = videoqa.answer_file(fake, records, setup['video_root'], out, batch_size=3,
                              frames=FRAMES, progress=False)
  assert stats == {'questions': 5, 'already': 0, 'answered': 4, 'failed': 1,
                   'complete': True}
  assert fake.batches == [3, 3, 3]                      # 8 questions, the last batch filled
  sums = _clip_sums(setup, {e['video_name'] for e in entries if e['video_name'] != 'not_there'})
  rows = _lines(out)
  want = [dict(e, id=r['question_id']) for e, r in zip(entries, records)
          if e['video_name'] != 'not_there']
  for row, e in zip(rows, want):
    assert set(row) == {'id', 'video_name', 'Q1', 'Q2', 'A', 'pred1', 'pred2'}
    assert {k: row[k] for k in e} == e
    assert row['pred1'] == f'{e["Q1"]} @ {sums[e["video_name"]]}'
    assert row['pred2'] == f'{e["Q2"]} @ {sums[e["video_name"]]}'
  assert len(rows) == len(want)
  assert [f['id'] for f in json.load(open(out + '.failures.json'))] == ['not_there_0']
  # score reads these lines as consistency pairs.
  from panda_jax.eval import score
  pairs = score.read_benchmark_predictions(out, 'consistency')
  assert [(p['question2'], p['pred2']) for p in pairs] == [(r['Q2'], r['pred2']) for r in rows]

  # The tiny model: both answers are its answers to Q1 and Q2 about the pair's video.
  real = str(tmp_path / 'real.jsonl')
  videoqa.answer_file(setup['predictor'], records, setup['video_root'], real,
                      batch_size=BATCH, frames=FRAMES, progress=False)
  row = _lines(real)[2]
  assert row['id'] == records[2]['question_id']
  v = videoqa.load_clip(qa.resolve_video(setup['video_root'], row['video_name']),
                        setup['cfg'].stab, FRAMES)
  direct = setup['predictor'].answer(np.stack([v['pixels']] * BATCH),
                                     np.stack([v['mask']] * BATCH),
                                     [row['Q1'], row['Q2'], row['Q1'], row['Q2']])
  assert (row['pred1'], row['pred2']) == (direct[0], direct[1])


def test_benchmark_generic_files_and_format_errors(setup, tmp_path):
  names = sorted({r['video_name'] for r in setup['records'] if r['video']})
  generic = tmp_path / 'temporal_qa.json'
  json.dump([{'video_name': names[0], 'Q': 'what happens first?', 'A': 'it moves'},
             {'video_name': names[0], 'Q': 'and then?', 'A': 'it stops'}], open(generic, 'w'))
  kind, records = videoqa.load_records(str(generic), None, setup['video_root'])
  assert kind == 'generic' and [r['questions'] for r in records] == [['what happens first?'],
                                                                     ['and then?']]
  fake = FakePredictor(setup['cfg'])
  out = str(tmp_path / 'temporal.jsonl')
  videoqa.answer_file(fake, records, setup['video_root'], out, batch_size=BATCH, frames=FRAMES,
                      progress=False)
  rows = _lines(out)
  assert [set(r) for r in rows] == [{'id', 'video_name', 'Q', 'A', 'pred'}] * 2
  assert [r['id'] for r in rows] == [f'{names[0]}_0', f'{names[0]}_1']
  assert rows[1]['pred'].startswith('and then? @ ')
  # A second run asks nothing.
  assert videoqa.answer_file(fake, records, setup['video_root'], out, batch_size=BATCH,
                             frames=FRAMES, progress=False)['already'] == 2
  bad = tmp_path / 'bad.json'
  json.dump([{'video_name': 'x', 'Q1': 'a?', 'A': 'b'}], open(bad, 'w'))
  with pytest.raises(qa.AnnotationError, match=r"bad.json: entry 0 has \['A', 'Q1', "
                     r"'video_name'\]; expected a VideoQA entry"):
    videoqa.load_records(str(bad), None, setup['video_root'])
  with pytest.raises(qa.AnnotationError, match=r'bad.json: entry 0: field "Q2" must be a '
                     r'non-empty string, got None \(a consistency entry has "video_name", '
                     r"""'Q1', 'Q2' and "A"\)"""):
    videoqa.load_records(str(bad), None, setup['video_root'], file_format='consistency')
  with pytest.raises(ValueError, match="format='generic_qa'; expected auto or one of"):
    videoqa.load_records(str(generic), None, setup['video_root'], file_format='generic_qa')
  with pytest.raises(ValueError, match='--answers=a.json is for VideoQA question files'):
    videoqa.load_records(str(generic), 'a.json', setup['video_root'])


def test_processes_share_the_videos_and_the_last_to_finish_merges(setup, tmp_path):
  """Process index and count faked (as teacher extraction's test does): each answers the
  questions of its share of the videos once; the last to finish writes the whole file."""
  pred = FakePredictor(setup['cfg'])
  kw = dict(batch_size=BATCH, frames=FRAMES, progress=False, workers=0)
  records, root = setup['records'], setup['video_root']
  one = str(tmp_path / 'one.json')
  alone = videoqa.answer_file(pred, records, root, one, **kw)
  assert alone['complete'] and json.load(open(one + '.complete.json'))['answered'] == \
      alone['answered']
  out = str(tmp_path / 'preds.json')
  json.dump({'questions': 1, 'of': 99}, open(out + '.done.0-of-2.json', 'w'))   # another file's
  second = videoqa.answer_file(pred, records, root, out, process=(1, 2), **kw)
  assert not second['complete'] and not os.path.exists(out)
  assert not os.path.exists(out + '.complete.json')
  first = videoqa.answer_file(pred, records, root, out, process=(0, 2), **kw)
  assert first['complete'] and os.path.exists(out + '.complete.json')
  n = len(records)
  assert first['questions'] + second['questions'] == n and first['questions'] and \
      second['questions']
  assert first['answered'] + second['answered'] == n - 1
  assert first['failed'] + second['failed'] == 1
  parts = [{r['id'] for r in _lines(f'{out}.part{i}-of-2')} for i in (0, 1)]
  assert not parts[0] & parts[1]
  # Each video's questions were asked by one process.
  video_of = {r['question_id']: r['video'] for r in records}
  assert not {video_of[q] for q in parts[0]} & {video_of[q] for q in parts[1]}
  rows = _lines(out)
  assert [r['id'] for r in rows] == [r['question_id'] for r in records
                                     if r['question_id'] in parts[0] | parts[1]]
  assert {r['id']: r for r in rows} == {r['id']: r for r in _lines(one)}
  assert json.load(open(out + '.failures.json')) == json.load(open(one + '.failures.json'))
  assert json.load(open(out + '.complete.json')) == {'questions': n, 'answered': n - 1,
                                                     'failed': 1, 'processes': 2}
  # Run again: nothing is asked twice, and the file is complete again.
  asked = len(pred.batches)
  again = [videoqa.answer_file(pred, records, root, out, process=(i, 2), **kw) for i in (0, 1)]
  assert [a['answered'] for a in again] == [0, 0] and again[1]['complete']
  assert len(pred.batches) == asked and _lines(out) == rows
  with pytest.raises(ValueError, match='process index 2 of 2'):
    videoqa.answer_file(pred, records, root, out, process=(2, 2), **kw)
