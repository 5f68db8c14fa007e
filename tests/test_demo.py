"""The main job (configs/demo.py) as a user runs it, scaled down: data, three stages, held-out
VideoQA, scores and the report, then a rerun that resumes instead of redoing."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from panda_jax.eval import score as score_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smoke demo's training phases, each in workdir/stage<phase>: stage 3a is stage 3's focus
# phase (configs/demo.py: data.focus_types).
PHASES = ('1', '2', '3a', '3')


# `python -m panda_jax.main ARGS` in a fresh process that says at the end whether TensorFlow
# was imported (the TensorBoard events are written without it).
_MAIN = """
import sys
from absl import app
from panda_jax import main
sys.argv = ['panda_jax.main'] + sys.argv[1:]
try:
  app.run(main.main)
finally:
  print('tensorflow imported:', 'tensorflow' in sys.modules, flush=True)
"""


def _run(workdir, *args):
  from conftest import subprocess_env
  env = subprocess_env(PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-c', _MAIN, '--config=configs/demo.py:smoke',
                         f'--workdir={workdir}', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def _table(report: str) -> dict:
  """{type: {'val': (questions, exact match, majority), 'test': (questions, exact match,
  majority, token F1)}} from report.md's accuracy table."""
  rows = {}
  num = r'([\d.]+)'
  for line in report.splitlines():
    m = re.match(rf'\| (\w+) \| (\d+) \| {num} \| {num} \| (\d+) \| {num} \| {num} \| {num} \|',
                 line)
    if m:
      g = m.groups()
      rows[g[0]] = {'val': (int(g[1]), float(g[2]), float(g[3])),
                    'test': (int(g[4]), float(g[5]), float(g[6]), float(g[7]))}
  return rows


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('demo')
  r = _run(workdir)
  assert r.returncode == 0, r.stderr[-4000:]
  return workdir, r


@pytest.mark.slow
def test_demo_writes_every_report_file(demo_run):
  workdir, r = demo_run
  for rel in ('report.md', 'scores.json', 'eval/val.jsonl', 'eval/test.jsonl',
              'eval/novel.jsonl', 'figures/loss.png',
              'figures/accuracy.png', 'figures/example.png', 'data/DONE.json', 'config.json',
              *(f'stage{s}/{f}' for s in PHASES for f in ('summary.json', 'metrics.jsonl'))):
    path = workdir / rel
    assert path.exists() and path.stat().st_size > 0, rel
  for fig in ('loss', 'accuracy', 'example'):
    assert (workdir / 'figures' / f'{fig}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'exact match, validation' in r.stdout and 'report.md' in r.stdout
  # The report states the seed and the splits of the run, and cites no other document.
  report = (workdir / 'report.md').read_text()
  data = json.load(open(workdir / 'data' / 'DONE.json'))
  assert '* Seed 0 (clips, initialisation and batch order).' in report
  for split, name in (('val', 'validation'), ('test', 'test'), ('novel', 'held-out conditions')):
    info = data['splits'][split]
    assert f'{name} {info["clips"]} clips, {info["questions"]} questions' in report
  assert 'README' not in report and 'docs/' not in report
  # Seeds: the data, the initialisation and the batch order of every stage follow it.
  for s in PHASES:
    c = json.load(open(workdir / f'stage{s}' / 'config.json'))
    assert (c['seed'], c['data']['shuffle_seed']) == (0, 0), s
  # Each stage starts from the previous one and trains what its stage trains.
  s1 = json.load(open(workdir / 'stage1' / 'summary.json'))
  s3 = json.load(open(workdir / 'stage3' / 'summary.json'))
  assert s1['trainable'] == ['^visual/', '^distill/'] and s3['trainable'] == ['.*']
  for s, before in (('2', '1'), ('3a', '2'), ('3', '3a')):
    assert json.load(open(workdir / f'stage{s}' / 'config.json'))['init']['from_run'] == \
        str(workdir / f'stage{before}'), s
  # Stage 3a trains on the focus questions alone, stage 3 on the conversations with them.
  assert json.load(open(workdir / 'stage3a' / 'config.json'))['data']['annotations'] == \
      str(workdir / 'data' / 'train_focus.json')
  assert json.load(open(workdir / 'stage3' / 'config.json'))['data']['annotations'] == \
      str(workdir / 'data' / 'train_instruct.json')
  # Every stage keeps its clips in the process's video cache (the next stage finds them).
  for s in PHASES:
    assert json.load(open(workdir / f'stage{s}' / 'config.json'))['data']['video_cache_mb'] \
        == 1024, s
  # The time line says how much of the host's CPU the hypervisor took meanwhile (Linux).
  total = next(l for l in (workdir / 'report.md').read_text().splitlines()
               if l.startswith('* Total of the phases'))
  if os.path.exists('/proc/stat'):
    assert re.search(r'the hypervisor (gave \d+ % of|took none of) this host', total), total


def test_steal_share_reads_the_hosts_cpu_counters(tmp_path):
  """The steal share between two /proc/stat readings: steal over all CPU time (guest time is
  inside user time, so it is not added); None without the file or without time passing."""
  from panda_jax.demo import run as demo_run
  stat = tmp_path / 'stat'
  stat.write_text('cpu  100 0 50 800 10 0 0 40 7 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n')
  a = demo_run.host_cpu_times(str(stat))
  assert a == [100, 0, 50, 800, 10, 0, 0, 40, 7, 0]
  stat.write_text('cpu  160 0 70 900 10 0 0 100 30 0\n')
  b = demo_run.host_cpu_times(str(stat))
  assert demo_run.steal_share(a, b) == pytest.approx(60 / (60 + 20 + 100 + 60))
  assert demo_run.steal_share(a, a) is None
  assert demo_run.host_cpu_times(str(tmp_path / 'missing')) is None
  assert demo_run.steal_share(None, b) is None
  stat.write_text('intr 1 2 3\n')
  assert demo_run.host_cpu_times(str(stat)) is None


def _params(workdir, step) -> dict:
  """Checkpoint `step`'s parameters, flat ('visual/projector/fc1/kernel': array)."""
  import pathlib
  import orbax.checkpoint as ocp
  from panda_jax.train import checkpoint as ckpt
  from panda_jax.tree import flatten
  m = ocp.CheckpointManager(pathlib.Path(workdir) / 'checkpoints', item_names=ckpt.ITEMS,
                            options=ocp.CheckpointManagerOptions(read_only=True))
  return flatten(m.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore())).params)


@pytest.mark.slow
def test_demo_stages_chain_through_checkpoints_and_each_learns(demo_run):
  """The stages of the demo's run (8 steps each, saved every 4): each one's loss falls,
  stage 1 trains the visual part and leaves every LLM weight as initialised, stage 2 starts
  from stage 1's final checkpoint and trains the LLM."""
  workdir, _ = demo_run
  for s in PHASES:
    metrics = [json.loads(l) for l in open(workdir / f'stage{s}' / 'metrics.jsonl')]
    assert [m['step'] for m in metrics] == list(range(1, 9)), s
    first, last = metrics[0]['loss'], metrics[-1]['loss']
    assert last < 0.8 * first, (s, first, last)
    assert sorted(int(p.name) for p in (workdir / f'stage{s}' / 'checkpoints').iterdir()
                  if p.name.isdigit()) == [4, 8]
  p4, p8 = _params(workdir / 'stage1', 4), _params(workdir / 'stage1', 8)
  llm = [k for k in p8 if k.startswith('llm/')]
  assert 'llm/lm_head/kernel' in llm and len(llm) > 10
  for k in llm:
    np.testing.assert_array_equal(p4[k], p8[k], err_msg=k)
  assert not np.array_equal(p4['visual/projector/fc1/kernel'], p8['visual/projector/fc1/kernel'])
  # Stage 2 restored stage 1's final weights (its log says so) and then trained the LLM.
  s2 = json.load(open(workdir / 'stage2' / 'config.json'))
  assert s2['init']['from_run'] == str(workdir / 'stage1')
  s2_first = _params(workdir / 'stage2', 4)
  assert not np.array_equal(s2_first['llm/lm_head/kernel'], p8['llm/lm_head/kernel'])


@pytest.mark.slow
def test_demo_events_match_the_log_and_tensorflow_is_never_imported(demo_run):
  """Each stage's TensorBoard event file (written without TensorFlow, read back with
  TensorBoard's reader) holds the loss the log printed at every step, and the stage's other
  scalars at every step."""
  from test_metrics_writer import _events
  workdir, r = demo_run
  assert 'tensorflow imported: False' in r.stdout, r.stdout[-2000:]
  logged = re.findall(r'step (\d+)/8 loss ([0-9.]+)', r.stderr)
  assert len(logged) == 8 * len(PHASES), r.stderr[-3000:]   # 8 steps of each stage
  for i, s in enumerate(PHASES):
    stage = {int(k): float(v) for k, v in logged[8 * i:8 * (i + 1)]}
    assert sorted(stage) == list(range(1, 9))
    acc = _events(workdir / f'stage{s}')
    loss = {e.step: e.value for e in acc.Scalars('loss')}
    assert sorted(loss) == sorted(stage), s
    for step, value in stage.items():
      assert round(loss[step], 4) == pytest.approx(value, abs=1e-4), (s, step, loss[step], value)
    summary = json.load(open(workdir / f'stage{s}' / 'summary.json'))
    assert loss[8] == pytest.approx(summary['loss'], abs=1e-6)
    for tag in ('ce', 'distill', 'grad_norm', 'steps_per_s', 'tokens_per_s'):
      assert [e.step for e in acc.Scalars(tag)] == list(range(1, 9)), (s, tag)


@pytest.mark.slow
def test_demo_report_table_equals_scores_recomputed_from_predictions(demo_run):
  from panda_jax.demo import report as report_lib
  workdir, _ = demo_run
  report = open(workdir / 'report.md').read()
  table = _table(report)
  data = json.load(open(workdir / 'data' / 'DONE.json'))
  saved = json.load(open(workdir / 'scores.json'))
  rows, questions = {}, {}
  for split in ('val', 'test', 'novel'):
    rows[split] = score_lib.read_predictions(str(workdir / 'eval' / f'{split}.jsonl'))
    questions[split] = json.load(open(data['splits'][split]['qa']))
    assert sorted(r['id'] for r in rows[split]) == sorted(q['question_id']
                                                          for q in questions[split])
    assert all(r['question'].endswith('Answer with a single word or phrase.')
               for r in rows[split])
  assert set(table) == {'direction', 'end_position', 'at_start', 'order'}
  for split in ('val', 'test'):
    scores = score_lib.score_records(rows[split])
    base = score_lib.majority_baseline(rows[split])
    assert saved[split]['exact_match'] == pytest.approx(scores['exact_match'])
    for t, cells in table.items():
      n, em, maj = cells[split][:3]
      if t not in scores['by_type']:
        assert n == 0
        continue
      assert n == scores['by_type'][t]['count']
      assert em == pytest.approx(scores['by_type'][t]['exact_match'], abs=5e-4)
      assert maj == pytest.approx(base[t]['accuracy'], abs=5e-4)
    # The accuracy points and the types under WEAK_MARGIN, recomputed from the predictions.
    points = report_lib.accuracy_points(dict(scores, baseline=base), rows[split])
    missed = [k for k, ok in points.items() if not ok]
    line = next(l for l in report.splitlines()
                if l.startswith(('Validation:' if split == 'val' else 'Test:')))
    assert (('all met.' in line) if not missed else f'not met: {"; ".join(missed)}.' in line)
    weak = [t for t in sorted(scores['by_type'])
            if scores['by_type'][t]['exact_match'] - base[t]['accuracy'] <
            report_lib.WEAK_MARGIN]
    assert (f'majority answer: {", ".join(weak)}.' in line) == bool(weak)
  for t, cells in table.items():
    f1 = score_lib.score_records(rows['test'])['by_type'][t]['token_f1']
    assert cells['test'][3] == pytest.approx(f1, abs=5e-4)
  # The held-out conditions table: every (condition, type) of the novel questions.
  cond = {q['question_id']: q['condition'] for q in questions['novel']}
  for (c, t) in {(cond[r['id']], r['type']) for r in rows['novel']}:
    group = [r for r in rows['novel'] if (cond[r['id']], r['type']) == (c, t)]
    em = score_lib.score_records(group)['exact_match']
    assert re.search(rf'\| {c} \| {t} \| {len(group)} \| {em:.3f} \|', report), (c, t)
  # The shape-dependence table (test split), recomputed from the predictions and the clips.
  from panda_jax.data.synthetic import PER_SHAPE_TYPES
  video = {q['question_id']: q['video_name'] for q in questions['test']}
  for t in PER_SHAPE_TYPES:
    by_clip = {}
    for r in rows['test']:
      if r['type'] == t:
        by_clip.setdefault(video[r['id']], []).append(r)
    pairs = [g for g in by_clip.values() if len(g) == 2]
    same = lambda k: sum(score_lib.normalize_answer(a[k]) == score_lib.normalize_answer(b[k])  # noqa: E731
                         for a, b in pairs)
    if pairs:
      assert f'| {t} | {len(pairs)} | {same("pred")} | {same("answer")} |' in report


def test_accuracy_points_and_the_generalisation_table():
  from panda_jax.demo import report as report_lib
  rec = lambda i, t, pred, ans: {'id': i, 'type': t, 'pred': pred, 'answer': ans}  # noqa: E731
  rows = [rec(f'd{i}', 'direction', d, d) for i, d in enumerate(
      ['left', 'right', 'up', 'down'] * 2)] + [rec('d9', 'direction', 'up', 'left')]
  rows += [rec(f'a{i}', 'at_start', 'no', a) for i, a in enumerate(['no'] * 6 + ['yes'] * 3)]
  scores = score_lib.score_records(rows)
  scores['baseline'] = score_lib.majority_baseline(rows)
  points = report_lib.accuracy_points(scores, rows)
  # direction 8/9 with all four answered; at_start always "no" = its majority answer: margin 0.
  assert list(points.values()) == [True, True, False, True]
  rows[:8] = [dict(r, pred='left') for r in rows[:8]]
  scores = dict(score_lib.score_records(rows), baseline=score_lib.majority_baseline(rows))
  assert list(report_lib.accuracy_points(scores, rows).values())[:2] == [False, False]
  qs = [{'question_id': 'd0', 'condition': 'colour-kind'},
        {'question_id': 'd1', 'condition': 'kind-direction'},
        {'question_id': 'a0', 'condition': 'kind-direction'}]
  got = report_lib.generalisation([rec('d0', 'direction', 'up', 'up'),
                                   rec('d1', 'direction', 'up', 'left'),
                                   rec('a0', 'at_start', 'no', 'no')], qs, scores)
  assert [(g['condition'], g['type'], g['count'], g['exact_match']) for g in got] == [
      ('colour-kind', 'direction', 1, 1.0), ('kind-direction', 'at_start', 1, 1.0),
      ('kind-direction', 'direction', 1, 0.0)]
  with pytest.raises(ValueError, match="'zz'"):
    report_lib.generalisation([rec('zz', 'direction', 'up', 'up')], qs, scores)


@pytest.mark.slow
def test_demo_rerun_resumes_instead_of_redoing(demo_run):
  workdir, _ = demo_run
  pred = workdir / 'eval' / 'test.jsonl'
  lines = pred.read_text().splitlines()
  # A kill during evaluation: the last answers (and a torn line) are lost.
  pred.write_text('\n'.join(lines[:-3]) + '\n' + lines[-3][:10])
  stamps = {s: os.path.getmtime(workdir / f'stage{s}' / 'summary.json') for s in PHASES}
  r = _run(workdir)
  assert r.returncode == 0, r.stderr[-4000:]
  assert r.stderr.count('already trained') == len(PHASES)
  assert {s: os.path.getmtime(workdir / f'stage{s}' / 'summary.json')
          for s in PHASES} == stamps
  again = pred.read_text().splitlines()
  assert len(again) == len(lines)
  assert again[:-3] == lines[:-3]
  assert sorted(json.loads(l)['id'] for l in again) == sorted(json.loads(l)['id']
                                                               for l in lines)


def test_demo_data_has_enough_held_out_questions_and_mixed_answers(tmp_path):
  from configs import demo as demo_config
  from panda_jax.data import synthetic
  from panda_jax.demo import run as demo_run
  config = demo_config.get_config()
  with config.unlocked():
    config.data.train_clips = 40
  data = demo_run.make_data(config, str(tmp_path / 'data'), progress=False)
  # Validation and test: at least 500 questions each, at least 40 of every type; the held-out
  # conditions' clips at least 300.
  for split in ('val', 'test'):
    info = data['splits'][split]
    assert info['questions'] >= 500 and min(info['by_type'].values()) >= 40, (split, info)
    assert set(info['by_type']) == {'direction', 'end_position', 'at_start', 'order'}
  assert data['splits']['novel']['questions'] >= 300
  assert data['seed'] == 0 and data['held_out'] == json.loads(json.dumps(
      dataclasses.asdict(synthetic.DEMO_HELD_OUT)))
  qs = [q for split in ('val', 'test', 'novel')
        for q in json.load(open(data['splits'][split]['qa']))]
  assert all(q['question'].endswith('\n' + synthetic.SHORT_ANSWER_PROMPT) for q in qs)
  conv = json.load(open(data['train_instruct']))
  answers = [(h['value'], g['value']) for e in conv
             for h, g in zip(e['conversations'][::2], e['conversations'][1::2])]
  short = [a for q, a in answers if q.endswith(synthetic.SHORT_ANSWER_PROMPT)]
  sentences = [a for q, a in answers if not q.endswith(synthetic.SHORT_ANSWER_PROMPT)]
  assert short and sentences
  assert all(len(a.split()) <= 3 for a in short)
  assert all(a.endswith('.') for a in sentences)
  # data.focus_types: one more conversation per focus type and two-shape training clip, a
  # single short question of that type.
  scenes = json.load(open(data['scenes']))
  two = [e['id'] for e in conv if e['id'] in scenes and len(scenes[e['id']]['shapes']) == 2]
  focus = [e for e in conv if e['id'] not in scenes]
  types = tuple(config.data.focus_types)
  assert types == ('at_start', 'direction', 'end_position')
  assert sorted(e['id'] for e in focus) == sorted(f'{c}_{t}' for c in two for t in types)
  assert two
  words = {'at_start': 'visible at the start', 'direction': 'In which direction',
           'end_position': 'At the end of the video'}
  for e in focus:
    assert len(e['conversations']) == 2
    assert words[e['id'].split('_', 2)[2]] in e['conversations'][0]['value']
  # Every caption conversation fits the caption stages' length (one that did not would be
  # skipped and counted, not cut), and every instruction conversation stage 3's.
  from panda_jax import config as config_lib
  from panda_jax.data.pipeline import ProcessSample
  for stage, key in ((2, 'train_captions'), ('3a', 'train_focus'), (3, 'train_instruct')):
    c = demo_run.stage_config(config, stage, data)
    process = ProcessSample(data['root'], data['tokenizer'], config_lib.resolve(c).model.stab,
                            c.data.frames, c.data.max_len)
    skipped = [r for r in map(process, json.load(open(data[key]))) if 'skip' in r]
    assert not skipped, (stage, c.data.max_len, skipped[:2])
  # Evaluation clips are in no training file.
  train_videos = {e['video'] for e in conv} | {e['video'] for e in
                                               json.load(open(data['train_captions']))}
  assert not {f'videos/{q["video_name"]}.mp4' for q in qs} & train_videos
  # Made once: a second call reads the summary.
  assert demo_run.make_data(config, str(tmp_path / 'data'), progress=False) == data


def test_caption_stages_use_their_own_sequence_length():
  from configs import demo as demo_config
  from panda_jax.demo import run as demo_run
  data = {'train_instruct': 'x', 'train_captions': 'y', 'root': 'r', 'tokenizer': 't',
          'train_focus': 'z'}
  config = demo_config.get_config()
  assert 0 < config.data.caption_max_len < config.data.max_len
  assert 0 < config.data.focus_max_len < config.data.max_len
  lengths = [demo_run.stage_config(config, s, data).data.max_len for s in (1, 2, '3a', 3)]
  assert lengths == [config.data.caption_max_len] * 2 + [config.data.focus_max_len,
                                                         config.data.max_len]
  # 0: every stage max_len (the smoke run's stages 2, 3a and 3 share one program).
  smoke = demo_config.get_config('smoke')
  assert [demo_run.stage_config(smoke, s, data).data.max_len for s in (1, 2, '3a', 3)] == \
      [smoke.data.max_len] * 4
  # Stage 3a: the focus conversations with stage 3a's own steps; none without them.
  c = demo_run.stage_config(config, '3a', data)
  assert (c.data.annotations, c.train.steps) == ('z', config.stages.focus.steps)
  assert demo_run.phases(config) == ('1', '2', '3a', '3')
  assert demo_run.phases(demo_config.get_config('nofocus')) == ('1', '2', '3')
  with config.unlocked():
    config.stages.focus.steps = 0
  assert demo_run.phases(config) == ('1', '2', '3')
  with pytest.raises(ValueError, match='focus conversations'):
    demo_run.stage_config(config, '3a', dict(data, train_focus=''))
  with pytest.raises(ValueError, match='3a or 3'):
    demo_run.stage_config(config, '4', data)
  with config.unlocked():
    config.data.caption_max_len = -1
  with pytest.raises(ValueError, match='caption_max_len=-1'):
    demo_run.stage_config(config, 1, data)


def test_every_ablation_names_valid_model_fields():
  from configs import demo as demo_config
  from panda_jax import config as config_lib
  from panda_jax.demo import ablations, run as demo_run
  config = demo_config.get_config('ablations')
  assert set(config.ablations) <= set(ablations.ABLATIONS)
  base = config_lib.panda_config(config.model)
  for name, overrides in ablations.ABLATIONS.items():
    c = demo_run.stage_config(config, 3, {'train_instruct': 'x', 'train_captions': 'y',
                                          'root': 'r', 'tokenizer': 't'},
                              model_overrides=overrides)
    cfg = config_lib.panda_config(c.model)           # validates the combination
    assert cfg != base, name
  with pytest.raises(ValueError, match='no_such'):
    with config.unlocked():
      config.ablations = ('no_such',)
    demo_run.ablation_overrides(config)


def test_ablations_are_chosen_on_the_command_line():
  # A tuple field: ml_collections refuses to override a list from the command line.
  from conftest import subprocess_env
  code = ('from absl import app\n'
          'from ml_collections import config_flags\n'
          'C = config_flags.DEFINE_config_file("config")\n'
          'app.run(lambda _: print(list(C.value.ablations)))\n')
  run = lambda *flags: subprocess.run(  # noqa: E731
      [sys.executable, '-c', code, '--config=configs/demo.py:ablations', *flags], cwd=ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=120)
  out = run("--config.ablations=('no_lste', 'avgpool')")
  assert out.stdout.strip() == "['no_lste', 'avgpool']", out.stderr[-2000:]
  out = run()
  from configs import demo as demo_config
  assert out.stdout.strip() == str(list(demo_config.DEFAULT_ABLATIONS)), out.stderr[-2000:]


@pytest.mark.slow
def test_report_puts_ablated_variants_side_by_side(demo_run, tmp_path):
  from configs import demo as demo_config
  from panda_jax.demo import report
  workdir, _ = demo_run
  import shutil
  for d in ('stage1', 'stage2', 'stage3', 'eval', 'data'):
    shutil.copytree(workdir / d, tmp_path / d)
  data = json.load(open(tmp_path / 'data' / 'DONE.json'))
  data['videos'] = str(workdir / 'data' / 'videos')
  scores = {'seconds': 1.0}
  for split in ('val', 'test', 'novel'):
    path = str(tmp_path / 'eval' / f'{split}.jsonl')
    rows = score_lib.read_predictions(path)
    scores[split] = dict(score_lib.score_records(rows),
                         baseline=score_lib.majority_baseline(rows), predictions=path)
  stages = {str(s): json.load(open(tmp_path / f'stage{s}' / 'summary.json')) for s in (1, 2, 3)}
  variant = lambda name, ov: {'name': name, 'overrides': ov, 'stages': stages,  # noqa: E731
                              'scores': scores}
  result = {'data': data, 'seconds_this_run': 1.0,
            'variants': [variant('full', {}), variant('no_row_token', {'stab.row_token': False})]}
  paths = report.write_report(demo_config.get_config('smoke'), str(tmp_path), result)
  text = open(paths['report']).read()
  assert '## Ablations' in text
  assert '| full | released model |' in text and '| validation margin |' in text
  assert '| no_row_token | `stab.row_token=False` |' in text
  assert open(paths['ablations'], 'rb').read()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_binding_sandbox_reads_the_tokens_the_demo_decoder_reads(demo_run):
  """`experiments/binding.py`'s `real_tokens` on the smoke demo's workdir: each clip's frozen visual tokens
  are exactly what the trained model splices into its decoder input for that clip (same
  values, same order), its shapes are the scene's, the result is cached, and the sandbox trains
  on them."""
  import jax
  from panda_jax.data.assembly import IMAGE_TOKEN, layout_batch
  from experiments import binding as bd
  from panda_jax.eval.videoqa import load_clip, load_model
  from panda_jax.models.panda import VideoPanda
  workdir, _ = demo_run
  data = bd.real_tokens(str(workdir), 'stage3', clips=12, batch=8, log=lambda s: None)
  tokens = data['tokens']
  assert tokens.shape[0] == 12 and tokens.shape[2] == 128
  cfg, variables = load_model(str(workdir / 'stage3'))
  clip = load_clip(str(workdir / 'data' / 'videos' / 'vid_00003.mp4'), cfg.stab, 4)
  ids = np.array([[1, 7, IMAGE_TOKEN, IMAGE_TOKEN, 9, IMAGE_TOKEN, IMAGE_TOKEN, 11]])
  lay = layout_batch(ids, None, np.ones_like(ids), clip['mask'][None], cfg.stab, max_len=96)
  batch = dict(lay, pixels=clip['pixels'][None], mask=clip['mask'][None])
  embeds, _ = jax.jit(lambda v, b: VideoPanda(cfg).apply(
      v, b, method=VideoPanda.embed_inputs))(variables, batch)
  spliced = np.asarray(embeds)[0][lay['visual_index'][0] >= 0]
  assert spliced.shape == tokens.shape[1:]
  np.testing.assert_allclose(tokens[3], spliced, rtol=1e-5, atol=1e-5)
  assert not np.allclose(tokens[3], tokens[4], atol=1e-3)
  scenes = json.load(open(workdir / 'data' / 'scenes.json'))
  for i in range(12):
    shapes = scenes[f'vid_{i:05d}']['shapes']
    assert [bd.REAL_COLOURS[c] for c in data['colour'][i] if c >= 0] == \
        [s['colour'] for s in shapes]
    assert data['appear'][i].tolist()[:len(shapes)] == [s['appear'] for s in shapes]
  # Cached: a second call reads the file (no model is loaded: a wrong stage would fail).
  again = bd.real_tokens(str(workdir), 'stage3', clips=12, log=lambda s: None)
  np.testing.assert_array_equal(again['tokens'], tokens)
  rows = bd.run('last', steps=4, batch=4, eval_every=2, tokens=data, inputs='raw', held_out=4,
                log=lambda s: None)
  assert [r[0] for r in rows] == [2, 4] and all(0.0 <= r[2] <= 1.0 for r in rows)


def test_shape_dependence_counts_clips_answered_alike_for_both_shapes():
  from panda_jax.demo.report import shape_dependence
  qs = [{'question_id': i, 'video_name': v, 'question': 'q', 'answer': 'a'} for i, v in
        [('a0', 'A'), ('a1', 'A'), ('b0', 'B'), ('b1', 'B'), ('c0', 'C'), ('o', 'A')]]
  rec = lambda i, t, pred, ans: {'id': i, 'type': t, 'pred': pred, 'answer': ans}  # noqa: E731
  preds = [
      # Clip A: at start asked about both shapes, the model says "Yes." to both (normalised
      # equal), the truth differs; direction asked about both, model differs, truth the same.
      rec('a0', 'at_start', 'Yes.', 'yes'), rec('a1', 'at_start', 'yes', 'no'),
      # Clip B: at start, model differs, truth differs.
      rec('b0', 'at_start', 'yes', 'yes'), rec('b1', 'at_start', 'no', 'no'),
      # Clip C: asked about one shape only: not counted.
      rec('c0', 'at_start', 'yes', 'yes'),
      # Not a per-shape type: ignored.
      rec('o', 'order', 'the red circle', 'the red circle')]
  preds += [rec('b0', 'direction', 'left', 'up'), rec('b1', 'direction', 'the right', 'up')]
  got = shape_dependence(preds, qs)
  assert got['at_start'] == {'clips': 2, 'same_pred': 1, 'same_truth': 0}
  assert got['direction'] == {'clips': 1, 'same_pred': 0, 'same_truth': 1}
  assert got['end_position'] == {'clips': 0, 'same_pred': 0, 'same_truth': 0}
  with pytest.raises(ValueError, match="'zz'"):
    shape_dependence([rec('zz', 'at_start', 'yes', 'yes')], qs)


def test_demo_keeps_compiled_programs_in_its_workdir_unless_a_cache_is_set(tmp_path):
  # run.compile_cache: JAX's persistent cache in workdir/cache/jax, where a program compiled by
  # one stage (the model's and the teacher's initialisation) is loaded by the next.
  from conftest import subprocess_env
  code = ('import sys, jax, jax.numpy as jnp\n'
          'from panda_jax.demo import run\n'
          'print(run.compile_cache(sys.argv[1]))\n'
          'jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n')
  env = subprocess_env(PYTHONPATH=ROOT)
  env.pop('JAX_COMPILATION_CACHE_DIR')
  work = tmp_path / 'work'
  r = subprocess.run([sys.executable, '-c', code, str(work)], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == str(work / 'cache' / 'jax')
  assert [e.name for e in os.scandir(work / 'cache' / 'jax')
          if e.name.startswith('jit_')], 'nothing compiled into the workdir\'s cache'
  # A cache the user (or the test suite) set is kept.
  other = tmp_path / 'other'
  env['JAX_COMPILATION_CACHE_DIR'] = str(other)
  r = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'work2')], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == str(other)
  assert not (tmp_path / 'work2').exists() and any(os.scandir(other))
