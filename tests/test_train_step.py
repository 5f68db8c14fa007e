"""The train step: learning, freezing, exact gradient accumulation, non-finite refusal."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import TINY, box_mask, random_video
from panda_jax.data.assembly import layout_batch
from panda_jax.models.panda import VideoPanda
from panda_jax.train.optimizer import make_optimizer, param_labels
from panda_jax.tree import flatten
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


def setup(cfg, optim, accum=1, total=20, return_grads=False):
  model = VideoPanda(cfg)
  batch = tiny_batch()
  v = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, batch)))
  labels = param_labels(flatten(v['params']).keys(), optim)
  tx, schedules = make_optimizer(labels, optim, total)
  state = init_state(v['params'], v['batch_stats'], labels, tx, jax.random.PRNGKey(1))
  step = jax.jit(make_train_step(model, labels, tx, schedules, accum_steps=accum,
                                 return_grads=return_grads))
  return state, step, batch, labels


def adam_moments(opt_state) -> dict:
  """{'mu/<path>': ..., 'nu/<path>': ...} of every Adam state in an optax state tree."""
  out = {}

  def visit(node):
    if hasattr(node, 'mu') and hasattr(node, 'nu'):
      for name in ('mu', 'nu'):
        for k, v in flatten(getattr(node, name)).items():
          if not isinstance(v, optax.MaskedNode):
            out[f'{name}/{k}'] = v
      return
    if isinstance(node, (tuple, list)):
      for c in node:
        visit(c)
    elif isinstance(node, dict):
      for c in node.values():
        visit(c)
    elif hasattr(node, 'inner_states'):
      visit(node.inner_states)
    elif hasattr(node, 'inner_state'):
      visit(node.inner_state)

  visit(opt_state)
  assert out, 'no Adam moments found in the optimizer state'
  return out


def assert_trees_close(a, b, rtol, what, nonzero=False, atol=0.0):
  """Every leaf of `a` and `b` (same paths) within `rtol` of the leaf's largest magnitude (plus
  `atol`; an all-zero leaf must be all zero in both); with `nonzero`, at most a tenth of the leaves may be
  all zeros (comparing zeros with zeros proves nothing). At initialisation the LSTE and GSTRA
  sit behind zero-initialised weights and get no gradient: check `nonzero` after a step."""
  fa = a if isinstance(a, dict) and all(isinstance(k, str) and '/' in k for k in a) \
      else flatten(a)
  fb = b if isinstance(b, dict) and all(isinstance(k, str) and '/' in k for k in b) \
      else flatten(b)
  assert sorted(fa) == sorted(fb), (what, sorted(set(fa) ^ set(fb))[:5])
  assert fa, what
  zero = [k for k in fb if not np.any(np.asarray(fb[k]))]
  if nonzero:
    assert len(zero) <= len(fb) // 10, f'{what}: {len(zero)} of {len(fb)} leaves are zero: {zero}'
  for k in fa:
    x, y = np.asarray(fa[k], np.float64), np.asarray(fb[k], np.float64)
    scale = max(np.max(np.abs(y)), 1e-30)
    err = np.max(np.abs(x - y))
    assert err <= rtol * scale + atol, \
        f'{what} {k}: max |a - b| {err:.3g} > {rtol} x {scale:.3g} + {atol:.3g}'


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
  """Gradients (every leaf), Adam moments, BatchNorm statistics and parameters over three
  steps: two micro-batches equal one large batch."""
  optim = optim_config(clip_norm=0.0)
  a, step1, batch, _ = setup(NO_DROPOUT, optim, accum=1, return_grads=True)
  b, step2, _, _ = setup(NO_DROPOUT, optim, accum=2, return_grads=True)
  # Micro-batch i takes rows i, i + 2 (videos 0, 2 then 1, 3) and BatchNorm's running
  # statistics are updated video by video: the large batch, in that order, sees the videos in
  # the same sequence (its losses and gradients do not depend on the order).
  order = np.array([0, 2, 1, 3])
  large = {k: np.asarray(v)[order] for k, v in batch.items()}
  for i in range(3):
    a, ma = step1(a, large)
    b, mb = step2(b, batch)
    np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-5)
    assert_trees_close(mb['grads'], ma['grads'], 1e-4, f'step {i + 1} gradient', nonzero=i > 0)
    assert_trees_close(adam_moments(b.opt_state), adam_moments(a.opt_state), 1e-4,
                       f'step {i + 1} Adam moment')
    assert_trees_close(b.batch_stats, a.batch_stats, 1e-5, f'step {i + 1} BatchNorm statistic')
    # Adam divides each gradient element by its own scale, so a parameter inherits the relative
    # error of its gradient element, which is large for the tiny ones (near Adam's eps, a
    # rounding difference in the gradient moves the update by a good fraction of lr).
    assert_trees_close(b.params, a.params, 1e-5, f'step {i + 1} parameter',
                       atol=2e-2 * optim.lr)


def test_non_finite_step_is_refused_and_counted(full):
  """A NaN batch changes no parameter, BatchNorm statistic or optimizer state; the step
  counter still advances (it counts batches, as the loop does) and `refused` counts it; the
  learning rate follows the applied updates."""
  state, step, batch, _ = full
  bad = dict(batch, pixels=np.full_like(batch['pixels'], np.nan))
  new, m = step(state, bad)
  assert int(m['finite']) == 0 and int(m['refused']) == 1
  assert (int(new.step), int(new.refused)) == (1, 1)
  for part in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(new, part), getattr(state, part))
  assert not np.array_equal(new.rng, state.rng)
  good, m2 = step(new, batch)
  assert int(m2['finite']) == 1 and (int(good.step), int(good.refused)) == (2, 1)
  # The schedule's first value, as in the step the refused one replaced (warm-up-free cosine).
  ref, m_ref = step(state, batch)
  assert float(m2['lr/lr_x1']) == float(m_ref['lr/lr_x1'])
  # The optimizer's counts (schedule positions) equal those of one applied step.
  counts = lambda t: [np.asarray(x) for x in jax.tree.leaves(t) if x.dtype == jnp.int32]
  assert counts(good.opt_state) and all(
      np.array_equal(x, y) and int(x) == 1 for x, y in zip(counts(good.opt_state),
                                                           counts(ref.opt_state)))


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


def test_weight_decay_skips_biases_and_norm_scales_as_the_hf_trainer():
  """With zero gradients AdamW's update is the decay alone: every decayed parameter shrinks by
  lr x weight_decay per step, within each learning-rate group; biases, norm scales (and frozen
  parameters) do not move."""
  from panda_jax.train.optimizer import decays
  params = {'llm': {'embed_tokens': {'embedding': jnp.full((3, 2), 2.0)},
                    'layers': {'attn_norm': {'scale': jnp.ones(2)},
                               'attn': {'q': {'kernel': jnp.full((2, 2), 4.0)}}}},
            'visual': {'ln': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
                       'proj': {'kernel': jnp.ones((2, 2)), 'bias': jnp.full(2, 3.0)}},
            'distill': {'kernel': jnp.ones(2)}}
  optim = optim_config(lr=0.1, weight_decay=0.5, clip_norm=0.0, frozen=['^distill/'],
                       lr_scale=[['^visual/', 2.0]])
  paths = flatten(params).keys()
  labels = param_labels(paths, optim)
  tx, _ = make_optimizer(labels, optim, total_steps=10)
  train = {k: v for k, v in flatten(params).items() if labels[k] != 'frozen'}
  from panda_jax.tree import unflatten
  train = unflatten(train)
  st = tx.init(train)
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, train), st, train)
  new = flatten(optax.apply_updates(train, upd))
  for k, v in flatten(train).items():
    rate = 0.1 * (2.0 if k.startswith('visual/') else 1.0)
    want = v * (1 - rate * 0.5) if decays(k) else v
    np.testing.assert_allclose(new[k], want, rtol=1e-6, err_msg=k)
  assert {k for k in paths if not decays(k)} == {
      'llm/layers/attn_norm/scale', 'visual/ln/scale', 'visual/ln/bias', 'visual/proj/bias'}


def test_chunked_cross_entropy_equals_the_full_computation_and_never_forms_all_logits():
  """Mean, count, sum and the gradients for hidden states and head kernel, for a chunk that
  leaves padding, the whole length and one position (float32), and in bfloat16."""
  from panda_jax.models.panda import chunked_cross_entropy, cross_entropy
  kh, kw, kl = jax.random.split(jax.random.PRNGKey(5), 3)
  hidden = jax.random.normal(kh, (2, 37, 16))
  kernel = 0.5 * jax.random.normal(kw, (16, 50))
  labels = jax.random.randint(kl, (2, 37), 0, 50)
  labels = labels.at[0, :9].set(-100).at[1, 30:].set(-100)     # prompt and padding ignored

  def full(h, w, dtype=jnp.float32):
    logits = jax.lax.dot_general(h.astype(dtype), w.astype(dtype),
                                 (((2,), (0,)), ((), ()))).astype(jnp.float32)
    return cross_entropy(logits, labels)

  for dtype, tol, chunks in ((jnp.float32, 1e-5, (8, 37, 1)), (jnp.bfloat16, 1e-2, (8,))):
    want = full(hidden, kernel, dtype)
    g_want = jax.grad(lambda h, w: full(h, w, dtype)[0], argnums=(0, 1))(hidden, kernel)
    for chunk in chunks:
      got = jax.jit(lambda h, w: chunked_cross_entropy(h, w, labels, chunk, dtype))(hidden,
                                                                                    kernel)
      np.testing.assert_allclose(got[0], want[0], rtol=tol)
      assert int(got[1]) == int(want[1]) == 2 * 36 - 8 - 7
      np.testing.assert_allclose(got[2], want[2], rtol=tol)
      g = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, labels, chunk, dtype)[0],
                           argnums=(0, 1)))(hidden, kernel)
      for a, b in zip(g, g_want):
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= \
            tol * np.abs(np.asarray(b, np.float32)).max(), (dtype, chunk)
  # Neither the loss nor its gradient program holds logits for all positions ([2, 37 or 40,
  # 50]); the full computation does (so the check can see them).
  whole = re.compile(r'\[2,(37|40),50\]')
  grad_of = lambda f: jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, kernel)
  assert whole.search(str(grad_of(lambda h, w: full(h, w)[0])))
  assert not whole.search(str(grad_of(
      lambda h, w: chunked_cross_entropy(h, w, labels, 8)[0])))
  with pytest.raises(ValueError, match='chunk=0'):
    chunked_cross_entropy(hidden, kernel, labels, 0)
  with pytest.raises(ValueError, match='loss_chunk=-1'):
    dataclasses.replace(CFG.llm, loss_chunk=-1).validate()


def test_train_step_with_chunked_loss_equals_the_default():
  """llm.loss_chunk (40 positions: 96 padded to 120) gives the default step's loss, every
  gradient leaf and the updated parameters."""
  optim = optim_config(clip_norm=0.0)
  chunked = dataclasses.replace(NO_DROPOUT,
                                llm=dataclasses.replace(NO_DROPOUT.llm, loss_chunk=40))
  a, step_a, batch, _ = setup(NO_DROPOUT, optim, return_grads=True)
  b, step_b, _, _ = setup(chunked, optim, return_grads=True)
  a, ma = step_a(a, batch)
  b, mb = step_b(b, batch)
  np.testing.assert_allclose(mb['loss'], ma['loss'], rtol=1e-6)
  np.testing.assert_allclose(mb['ce'], ma['ce'], rtol=1e-6)
  assert_trees_close(mb['grads'], ma['grads'], 1e-5, 'gradient')
  assert_trees_close(b.params, a.params, 1e-6, 'parameter', atol=1e-2 * optim.lr)


def test_loss_at_learned_positions_only_equals_the_default():
  """llm.loss_positions = K (the head on the first K learned positions of each row only) gives
  the default step's loss and every gradient leaf when no row has more than K learned tokens;
  one fewer loses a token, which `learned_overflow` (what the loop refuses) reports."""
  from panda_jax.models.panda import learned_overflow, learned_positions
  from panda_jax.train.loop import _check_loss_positions
  optim = optim_config(clip_norm=0.0)
  a, step_a, batch, _ = setup(NO_DROPOUT, optim, return_grads=True)
  labels = np.asarray(batch['labels'])
  k = int(np.sum(labels[:, 1:] >= 0, axis=1).max())
  assert 0 < k < labels.shape[1] // 2
  pos, tgt = learned_positions(jnp.asarray(labels), k + 2)
  for row, p, t in zip(labels, np.asarray(pos), np.asarray(tgt)):
    want = np.flatnonzero(row[1:] >= 0)
    np.testing.assert_array_equal(p[:len(want)], want)
    np.testing.assert_array_equal(t, np.pad(row[1:][want], (0, k + 2 - len(want)),
                                            constant_values=-1))
  gathered = lambda n: dataclasses.replace(
      NO_DROPOUT, llm=dataclasses.replace(NO_DROPOUT.llm, loss_positions=n))
  b, step_b, _, _ = setup(gathered(k), optim, return_grads=True)
  _, ma = step_a(a, batch)
  _, mb = step_b(b, batch)
  np.testing.assert_allclose(mb['loss'], ma['loss'], rtol=1e-6)
  np.testing.assert_allclose(mb['ce'], ma['ce'], rtol=1e-6)
  assert_trees_close(mb['grads'], ma['grads'], 1e-5, 'gradient')
  # The head never forms logits for every position ([B, L, V]); the default does.
  v = {'params': b.params, 'batch_stats': b.batch_stats}
  shape = 'f32[%d,%d,%d]' % (labels.shape + (NO_DROPOUT.llm.vocab_size,))
  jaxpr = lambda cfg: str(jax.make_jaxpr(lambda v, x: VideoPanda(cfg).apply(v, x)['ce'])(
      v, jax.tree.map(jnp.asarray, batch)))
  assert shape in jaxpr(NO_DROPOUT) and shape not in jaxpr(gathered(k))
  assert learned_overflow(labels, k).max() == 0 and learned_overflow(labels, k - 1).max() == 1
  # One position fewer than a row's learned tokens loses one: the loss moves.
  inputs = jax.tree.map(jnp.asarray, batch)
  ce = lambda n: float(VideoPanda(gathered(n)).apply(v, inputs)['ce'])
  assert ce(k) == pytest.approx(float(ma['ce']), rel=1e-6)
  assert abs(ce(k - 1) - float(ma['ce'])) > 1e-4
  run = lambda n: type('Run', (), {'model': gathered(n)})
  _check_loss_positions({'labels': labels}, run(k), 0)
  with pytest.raises(ValueError, match=f'has {k} learned tokens but model.llm.loss_positions='
                                       f'{k - 1}'):
    _check_loss_positions({'labels': labels}, run(k - 1), 0)
  with pytest.raises(ValueError, match='loss_positions=-1'):
    dataclasses.replace(CFG.llm, loss_positions=-1).validate()
