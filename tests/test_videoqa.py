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
  assert stats == {'questions': n, 'already': 0, 'answered': n - 1, 'failed': 1}
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
  assert stats == {'questions': n, 'already': 2, 'answered': n - 3, 'failed': 1}
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


def test_command_line(setup, first_run, tmp_path):
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
  procs = [subprocess.Popen(a, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for a in (args, bad_args)]
  outs = [p.communicate(timeout=600) for p in procs]
  run, bad = [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs)]
  assert run.returncode == 0, run.stderr[-3000:]
  n = len(setup['records'])
  assert f'{n} questions, {n - 1} answered now, 0 already there, 1 without a usable video' \
      in run.stdout
  assert {r['id']: r['pred'] for r in _lines(out)} == \
      {r['id']: r['pred'] for r in _lines(first_run[0])}
  assert bad.returncode == 2 and 'expected a JSON list' in bad.stderr
