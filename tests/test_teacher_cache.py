"""Cached teacher features: extraction (CLI, resume, failures), reading them in the pipeline,
training on them equals training with the online teacher, and the teacher never learns."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_env
from panda_jax import config as config_lib
from panda_jax.data import pipeline, synthetic
from panda_jax.data import teacher_features as features
from panda_jax.teacher import extract
from panda_jax.data.sources import synthetic_data
from panda_jax.teacher.model import create_teacher
from panda_jax.train.data import build_train_iterator
from panda_jax.train.step import teacher_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data, **train_fields):
  c = config_lib.train_config(2, 'tiny')
  c.data.annotations = str(data['annotations'])
  c.data.video_root = str(data['root'])
  c.data.tokenizer = str(data['root'] / 'tokenizer')
  c.model.stab.dropout = 0.0
  c.mesh.data, c.mesh.tensor = 4, 2       # the 8 fake devices of conftest
  for k, v in train_fields.items():
    setattr(c.train, k, v)
  return c


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Synthetic captions for 8 videos plus one entry whose video is corrupt."""
  work = tmp_path_factory.mktemp('teacher_cache')
  c = config_lib.train_config(2, 'tiny')
  c.data.synthetic_videos = 8
  captions, root, _ = synthetic_data(c, str(work))
  root = work / 'cache' / 'synthetic'
  broken = synthetic.write_broken_files(str(root / 'broken'))
  entries = json.load(open(captions))
  bad = dict(entries[0], id='broken', video=os.path.relpath(broken['corrupt'], root))
  annotations = work / 'with_broken.json'
  json.dump(entries + [bad], open(annotations, 'w'))
  return {'root': root, 'annotations': annotations, 'clean': captions,
          'videos': sorted({e['video'] for e in entries}), 'bad': bad['video']}


@pytest.fixture(scope='module')
def extracted(data, tmp_path_factory):
  """Features written by the command-line tool (one process, one device)."""
  out = tmp_path_factory.mktemp('features')
  env = subprocess_env()      # one device and this session's compilation cache
  args = [sys.executable, '-m', 'panda_jax.teacher.extract', '--config=configs/stage2.py:tiny',
          f'--config.data.annotations={data["annotations"]}',
          f'--config.data.video_root={data["root"]}',
          f'--config.data.tokenizer={data["root"] / "tokenizer"}', f'--out={out}',
          '--batch_size=4']
  run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return {'out': out, 'stdout': run.stdout, 'stderr': run.stderr}


def test_cli_writes_every_decodable_video_and_lists_failures(data, extracted):
  out = extracted['out']
  n = len(data['videos'])
  assert f'{n + 1} videos, {n} written, 0 already there, 1 undecodable' in extracted['stdout']
  manifest = features.read_manifest(str(out))
  tc = config_lib.teacher_config(config_lib.model_config('tiny'))
  assert manifest['complete'] and manifest['frames'] == 4 and manifest['failed'] == 1
  assert json.load(open(out / 'done.0-of-1.json')) == {'videos': n + 1, 'failed': 1, 'of': n + 1}
  assert (manifest['grid'], manifest['hidden']) == (tc.grid, tc.hidden)
  for v in data['videos']:
    a = np.load(features.feature_path(str(out), v))
    assert a.shape == (4, tc.grid ** 2, tc.hidden) and np.isfinite(a).all()
  failures = json.load(open(out / features.FAILURES))
  assert [f['video'] for f in failures] == [data['bad']] and failures[0]['reason']
  assert not os.path.exists(features.feature_path(str(out), data['bad']))
  assert 'teacher features' in extracted['stderr']          # the progress bar


def test_features_are_the_teachers_output_on_the_training_frames(data, extracted):
  from panda_jax.data.video import load_video
  c = _config(data)
  run = config_lib.resolve(c)
  tc = run.teacher
  mesh = extract._local_mesh()
  teacher, params, _ = create_teacher(run, mesh, c.seed, c.data.frames)
  v = data['videos'][3]
  px = load_video(os.path.join(data['root'], v), num=4, size=112, teacher_size=tc.image_size,
                  patch=14)['teacher_pixels']
  want = np.asarray(teacher.apply({'params': params}, px[None]))[0]
  got = np.load(features.feature_path(str(extracted['out']), v))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_extraction_resumes_where_it_stopped(data, extracted, tmp_path):
  out = tmp_path / 'features'
  shutil.copytree(extracted['out'], out)
  gone = features.feature_path(str(out), data['videos'][5])
  kept = features.feature_path(str(out), data['videos'][0])
  before = np.load(gone)
  os.remove(gone)
  os.utime(kept, (1, 1))                       # an old mtime: a rewrite would change it
  stats = extract.extract(_config(data), str(out), progress=False, batch_size=8)
  n = len(data['videos'])
  assert stats == {'videos': n + 1, 'existing': n - 1, 'written': 1, 'failed': 1,
                   'complete': True}
  assert os.stat(kept).st_mtime == 1
  np.testing.assert_allclose(np.load(gone), before, rtol=1e-5, atol=1e-5)
  # Another teacher must not write into these features.
  other = _config(data)
  other.model.teacher.layers = 2
  other.model.teacher.select_layer = -1
  with pytest.raises(features.FeatureError, match='another teacher'):
    extract.extract(other, str(out), progress=False)


def test_extraction_shared_by_two_processes_is_complete_when_the_last_share_is(data, extracted,
                                                                               tmp_path):
  """Process index and count faked (as `global_steps` fakes its gather): each process takes its
  share; whichever finishes last marks the features complete. Markers of another process count
  or another data set do not count."""
  out = tmp_path / 'features'
  shutil.copytree(extracted['out'], out)
  for name in (features.MANIFEST, 'done.0-of-1.json'):
    os.remove(out / name)
  c = _config(data)
  n = len(data['videos']) + 1                       # the broken video is one of them
  json.dump({'videos': 5, 'failed': 0, 'of': 99}, open(out / 'done.0-of-2.json', 'w'))
  json.dump({'videos': n, 'failed': 1, 'of': n}, open(out / 'done.0-of-3.json', 'w'))
  second = extract.extract(c, str(out), progress=False, process=(1, 2))
  assert second['videos'] == n // 2 and not second['complete']
  assert not os.path.exists(out / features.MANIFEST)            # process 0 writes it
  first = extract.extract(c, str(out), progress=False, process=(0, 2))
  assert first['videos'] == n - n // 2 and first['complete']
  manifest = features.read_manifest(str(out))
  assert manifest['complete'] and manifest['failed'] == 1
  failed = [f['video'] for i in (0, 1) for f in json.load(open(out / f'failures.json.{i}'))]
  assert failed == [data['bad']]
  # Process 0 starting again clears "complete" until every share is done again.
  os.remove(out / 'done.1-of-2.json')
  assert not extract.extract(c, str(out), progress=False, process=(0, 2))['complete']
  assert not features.read_manifest(str(out))['complete']
  assert extract.extract(c, str(out), progress=False, process=(1, 2))['complete']
  assert features.read_manifest(str(out))['complete']
  with pytest.raises(ValueError, match='process index 2 of 2'):
    extract.extract(c, str(out), progress=False, process=(2, 2))


def test_pipeline_reads_features_and_skips_videos_without_them(data, extracted, tmp_path):
  out = tmp_path / 'features'
  shutil.copytree(extracted['out'], out)
  os.remove(features.feature_path(str(out), data['videos'][2]))
  c = _config(data)
  stab = config_lib.resolve(c).model.stab
  proc = pipeline.ProcessSample(str(data['root']), c.data.tokenizer, stab, 4, 512,
                                teacher_features=str(out))
  records = pipeline.load_annotations(str(data['clean']))
  by_video = {r['video']: r for r in records}
  s = proc(by_video[data['videos'][1]])
  assert 'teacher_pixels' not in s
  np.testing.assert_array_equal(
      s['teacher'], np.load(features.feature_path(str(out), data['videos'][1])))
  skip = proc(by_video[data['videos'][2]])
  assert skip['skip'] == 'missing_teacher_features' and 'no cached' in skip['detail']
  with pytest.raises(features.FeatureError, match='frames=4 .the run needs 8'):
    pipeline.ProcessSample(str(data['root']), c.data.tokenizer, stab, 8, 512,
                           teacher_features=str(out))
  with pytest.raises(features.FeatureError, match='relative to the video root'):
    features.feature_path(str(out), '../outside.mp4')


def test_teacher_targets_carry_no_gradient_to_the_teacher():
  import dataclasses
  from panda_jax.models.teacher import VideoTeacher
  tc = dataclasses.replace(config_lib.teacher_config(config_lib.model_config('tiny')),
                           layers=2, select_layer=-1)
  teacher = VideoTeacher(tc)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, tc.image_size, tc.image_size, 3))
  # Jitted: op by op, every parameter shape compiled its own random draws, and every op of the
  # forward and backward passes its own program.
  params = jax.jit(teacher.init)(jax.random.PRNGKey(1), x)['params']
  grad = lambda f: jax.jit(jax.grad(lambda p: jnp.sum(f(p) ** 2)))  # noqa: E731
  g = grad(lambda p: teacher_targets(teacher, p, x))(params)
  assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(g))
  # The same loss without the stop reaches the teacher: the check above can fail.
  g = grad(lambda p: teacher.apply({'params': p}, x))(params)
  assert any(np.any(np.asarray(a)) for a in jax.tree.leaves(g))


@pytest.mark.slow
def test_cached_features_train_exactly_like_the_online_teacher(data, extracted, tmp_path):
  """Two train steps (`make_train_step`, dropout on) on the features the command line wrote,
  read by the pipeline, give the gradients (every leaf) and parameters of the same two steps
  with the teacher run inside the step on the same batches."""
  import flax.linen as nn
  from panda_jax import sharding
  from panda_jax.models.panda import VideoPanda
  from panda_jax.train import loop
  from panda_jax.train.step import make_train_step
  from test_train_step import assert_trees_close
  cached = _config(data, steps=2, teacher='cached')
  cached.data.annotations = str(data['clean'])
  cached.data.teacher_features = str(extracted['out'])
  online = _config(data, steps=2, teacher='online')
  online.data.annotations = str(data['clean'])
  for c in (cached, online):
    c.mesh.data, c.mesh.tensor = 1, 1               # one device: the property is not sharding
    c.model.stab.dropout = 0.5                      # the same masks in both (the same rng)

  def batches(c, work):
    it = build_train_iterator(c, str(tmp_path / work))
    spec = config_lib.resolve(c).batch
    return [{k: np.asarray(b[k]).astype(spec[k][1]) for k in spec}
            for b in (next(it), next(it))]
  from_cache, from_frames = batches(cached, 'cached'), batches(online, 'online')
  for a, b in zip(from_cache, from_frames):
    assert 'teacher' in a and 'teacher_pixels' not in a and 'teacher_pixels' in b
    np.testing.assert_array_equal(a['text_ids'], b['text_ids'])     # the same samples

  mesh = sharding.make_mesh(online.mesh.to_dict(), jax.devices()[:1])
  run = config_lib.resolve(online)
  model = VideoPanda(run.model)
  with jax.set_mesh(mesh), nn.logical_axis_rules(run.rules):
    state, _, labels, tx, schedules = loop.create_state(online, run, mesh, model,
                                                        jax.random.PRNGKey(online.seed))
    teacher, tparams, _ = create_teacher(run, mesh, online.seed, online.data.frames)
    with_teacher = jax.jit(make_train_step(model, labels, tx, schedules, teacher=teacher,
                                           return_grads=True))
    without = jax.jit(make_train_step(model, labels, tx, schedules, return_grads=True))
    a = b = state
    for i in range(2):
      a, ma = without(a, from_cache[i])
      b, mb = with_teacher(b, from_frames[i], tparams)
      assert float(mb['distill']) > 0
      np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=2e-5)
      assert_trees_close(ma['grads'], mb['grads'], 1e-4, f'step {i + 1} gradient',
                         nonzero=i > 0)
  # Gradients are the tight comparison; Adam turns a rounding difference in a gradient element
  # near its eps into a good fraction of lr (see test_train_sharded).
  assert_trees_close(a.params, b.params, 1e-5, 'parameter after two steps',
                     atol=0.2 * online.optim.lr)
  assert_trees_close(a.batch_stats, b.batch_stats, 1e-5, 'BatchNorm statistic')


def test_teachers_are_named_by_config():
  lb = config_lib.teacher_config(config_lib.train_config(2, 'tiny').model)
  assert lb.temporal and lb.activation == 'gelu'
  c = config_lib.train_config(2, 'tiny,teacher=clip')
  clip = config_lib.teacher_config(c.model)
  assert not clip.temporal and clip.activation == 'quick_gelu'
  assert (clip.hidden, clip.layers) == (lb.hidden, lb.layers)
  from panda_jax.models.teacher import VideoTeacher
  x = jnp.zeros((1, 4, clip.image_size, clip.image_size, 3))
  shapes = jax.eval_shape(VideoTeacher(clip).init, jax.random.PRNGKey(0), x)['params']
  assert 'temporal_attn' not in str(jax.tree_util.tree_structure(shapes))
  assert 'temporal_attn' in str(jax.tree_util.tree_structure(
      jax.eval_shape(VideoTeacher(lb).init, jax.random.PRNGKey(0), x)['params']))
  with pytest.raises(ValueError, match="unknown option 'big'"):
    config_lib.train_config(2, 'tiny,big')
  with pytest.raises(ValueError, match="teacher 'dino'; expected one of"):
    config_lib.train_config(2, 'teacher=dino')
  c.model.teacher.temporal = True        # contradicts the name
  with pytest.raises(ValueError, match="teacher_name='clip' needs"):
    config_lib.teacher_config(c.model)


def test_a_feature_file_that_cannot_be_read_is_a_feature_error(tmp_path):
  """Missing, empty (np.load raises EOFError), truncated and misshaped files each give a
  FeatureError naming the file: the pipeline counts it as missing_teacher_features."""
  good = str(tmp_path / 'good.npy')
  features.save(good, np.ones((2, 4, 3)))
  np.testing.assert_array_equal(features.load(good, (2, 4, 3)), np.ones((2, 4, 3)))
  (tmp_path / 'empty.npy').write_bytes(b'')
  (tmp_path / 'cut.npy').write_bytes(open(good, 'rb').read()[:40])
  for name, words in (('missing.npy', 'no cached teacher features'),
                      ('empty.npy', 'unreadable'), ('cut.npy', 'unreadable'),
                      ('good.npy', 'of shape')):
    with pytest.raises(features.FeatureError, match=f'{name}: .*{words}'):
      features.load(str(tmp_path / name), (2, 4, 4) if name == 'good.npy' else (2, 4, 3))
