"""The train step: learning, freezing, exact gradient accumulation, non-finite refusal."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import TINY, box_mask, random_video
from panda_jax.data.assembly import layout_batch
from panda_jax.models.panda import VideoPanda
from panda_jax.train.optimizer import flatten, make_optimizer, param_labels
from panda_jax.train.step import init_state, make_train_step
from test_predict import CFG

NO_DROPOUT = dataclasses.replace(CFG, stab=dataclasses.replace(CFG.stab, dropout=0.0))


def tiny_batch(b=4, f=4, seed=0):
  px = random_video(jax.random.PRNGKey(seed), b, f)
  boxes = [[(0, 112, 0, 112)] * f, [(28, 84, 0, 112)] * f, [(0, 112, 14, 98)] * f,
           [(0, 112, 0, 112), None, (28, 84, 0, 112), None]]
  mask = np.concatenate([box_mask(1, f, boxes[i % 4]) for i in range(b)])
  rng = np.random.default_rng(seed)
  ids = np.concatenate([np.array([[1, 7] + [-200] * f + [5]] * b),
                        rng.integers(3, 300, (b, 6))], axis=1)
  labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - 6, ids, -100)
  lay = layout_batch(ids, labels, np.ones_like(ids), mask, TINY, max_len=96)
  teacher = np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 1), (b, f, 16, 16)))
  return dict(lay, pixels=np.asarray(px), mask=mask, teacher=teacher,
              teacher_valid=mask.reshape(b, f, -1).max(-1) > 0)


def optim_config(**kw):
  c = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_ratio=0.0, end_lr_ratio=0.1, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0, clip_norm=1.0, trainable=['.*'], frozen=[], lr_scale=[]))
  c.update(kw)
  return c


def setup(cfg, optim, accum=1, total=20):
  model = VideoPanda(cfg)
  batch = tiny_batch()
  v = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, batch)))
  labels = param_labels(flatten(v['params']).keys(), optim)
  tx, schedules = make_optimizer(labels, optim, total)
  state = init_state(v['params'], v['batch_stats'], labels, tx, jax.random.PRNGKey(1))
  step = jax.jit(make_train_step(model, labels, tx, schedules, accum_steps=accum))
  return state, step, batch, labels


@pytest.fixture(scope='module')
def full():
  """One compiled step where everything trains, shared by the tests below."""
  return setup(CFG, optim_config())


def test_loss_goes_down_and_everything_trains(full):
  state, step, batch, _ = full
  first = None
  for _ in range(8):
    state, m = step(state, batch)
    first = float(m['loss']) if first is None else first
  assert float(m['loss']) < 0.8 * first
  assert int(state.step) == 8


def test_frozen_llm_is_bitwise_unchanged_and_has_no_optimizer_state():
  optim = optim_config(trainable=['^visual/', '^distill/'])
  state, step, batch, labels = setup(CFG, optim)
  before = jax.tree.map(np.asarray, state.params)
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  n_train = sum(v.size for k, v in flatten(before).items() if not k.startswith('llm/'))
  assert n_opt <= 2 * n_train + 16           # mu and nu of the trainable parameters only
  for _ in range(3):
    state, m = step(state, batch)
  after = flatten(jax.tree.map(np.asarray, state.params))
  for k, v in flatten(before).items():
    if k.startswith('llm/'):
      np.testing.assert_array_equal(after[k], v, err_msg=k)
  assert not np.array_equal(after['visual/projector/fc1/kernel'],
                            flatten(before)['visual/projector/fc1/kernel'])


def test_gradient_accumulation_equals_one_large_batch():
  optim = optim_config(clip_norm=0.0)
  s1, step1, batch, _ = setup(NO_DROPOUT, optim, accum=1)
  s2, step2, _, _ = setup(NO_DROPOUT, optim, accum=2)
  a, ma = step1(s1, batch)
  b, mb = step2(s2, batch)
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-5)
  np.testing.assert_allclose(ma['grad_norm'], mb['grad_norm'], rtol=1e-4)
  # Adam's first step moves each weight by about lr * sign(grad): allow float noise there.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4),
               a.params, b.params)
  # BatchNorm running statistics are updated once per video in micro-batch order (videos 0, 2
  # then 1, 3 here), so they match one large batch only to within that reordering.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0.05, atol=0.02),
               a.batch_stats, b.batch_stats)


def test_non_finite_loss_leaves_the_state_unchanged(full):
  state, step, batch, _ = full
  bad = dict(batch, pixels=np.full_like(batch['pixels'], np.nan))
  new, m = step(state, bad)
  assert int(m['finite']) == 0 and int(new.step) == 0
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


def test_labels_and_schedule_from_config():
  paths = ['llm/layers/attn/q/kernel', 'visual/stab/lsd/q/kernel', 'distill/proj_kernel']
  labels = param_labels(paths, optim_config(trainable=['^visual/', '^distill/'],
                                            lr_scale=[['^distill/', 2.0]]))
  assert labels == {'llm/layers/attn/q/kernel': 'frozen', 'visual/stab/lsd/q/kernel': 'lr_x1',
                    'distill/proj_kernel': 'lr_x2'}
  with pytest.raises(ValueError, match='matches no parameter'):
    param_labels(paths, optim_config(trainable=['^nothing/']))
  with pytest.raises(ValueError, match='invalid regex'):
    param_labels(paths, optim_config(trainable=['(']))
  from panda_jax.train.optimizer import schedule
  s = schedule(optim_config(lr=1.0, warmup_ratio=0.1, end_lr_ratio=0.0), 100)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6 and float(s(100)) < 1e-6
