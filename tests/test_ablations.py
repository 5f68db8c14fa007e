"""Ablation switches (README "Ablations"): parameter counts, forward and train step of each,
what each computes, and the default path unchanged."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, box_mask, random_video
from panda_jax import golden
from panda_jax.data.assembly import layout_batch
from panda_jax.models.distill import DistillConfig, cosine_distill_loss, mse_distill_loss
from panda_jax.models.panda import PandaConfig, VideoPanda
from panda_jax.models.stab import StabConfig, VisualTokenizer, frame_layout
from panda_jax.train.optimizer import make_optimizer, param_labels
from panda_jax.tree import flatten, unflatten
from panda_jax.train.step import init_state, make_train_step
from test_predict import CFG
from test_train_step import optim_config

C, R = TINY.hidden, TINY.lste_hidden


def _sqa():
  """LSD / FSRA: q_norm and kv_norm (2C each), q, k, v (C x C, no bias), out (C x C + C)."""
  return 4 * C * C + 5 * C


def _lste():
  """BN (2C), down (C x R + R), temporal (3R + R), up (R x C + C), dpe (27C + C)."""
  return 2 * C + (C * R + R) + 4 * R + (R * C + C) + 28 * C


def _gstra():
  """query, ln_1/2/3, q/k/v/out (C x C + C each), fc (C x 4C + 4C), proj (4C x C + C)."""
  return C + 6 * C + 4 * (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)


def _distill_head(d: DistillConfig):
  k, l, t = len(d.layers), d.llm_hidden, d.teacher_hidden
  return 2 * k * l + k * l * t + (t * t + t) + (l * t + t)


# name -> (stab fields, distill fields, parameters removed, subtrees that must be absent).
VARIANTS = {
    'lste_off': (dict(lste=False), {}, _lste(), ['visual/stab/lste/']),
    'gstra_off': (dict(gstra=False), {}, _gstra() + C, ['visual/stab/gstra/',
                                                         'visual/stab/balance']),
    'fsra_off': (dict(fsra=False), {}, _sqa() + 2 * C, ['visual/stab/fsra/',
                                                         'visual/stab/fsra_query',
                                                         'visual/stab/balance']),
    'row_off': (dict(row_token=False), {}, C, ['visual/stab/row_token']),
    'avgpool': (dict(downsample='avgpool'), {}, _sqa(), ['visual/stab/lsd/']),
    'no_downsample': (dict(downsample='none'), {}, _sqa(), ['visual/stab/lsd/']),
    'lsd_before': (dict(lsd_position='before'), {}, 0, []),
    'mse': ({}, dict(loss='mse'), 0, []),
    'no_distill': ({}, dict(loss='none'), _distill_head(CFG.distill), ['distill/']),
}


def variant(name: str) -> PandaConfig:
  stab, distill, _, _ = VARIANTS[name]
  return dataclasses.replace(CFG, stab=dataclasses.replace(CFG.stab, **stab),
                             distill=dataclasses.replace(CFG.distill, **distill))


# Frames: whole, letterboxed (rows 2-5 of 8 patches), odd offset and width (columns 1-6),
# all padding.
BOXES = [(0, 112, 0, 112), (28, 84, 0, 112), (0, 112, 14, 98), None]


def make_batch(cfg: PandaConfig, b: int = 2, f: int = 4) -> dict:
  st = cfg.stab
  mask = np.concatenate([box_mask(1, f, BOXES[i:] + BOXES[:i]) for i in range(b)])
  ids = np.array([[1, 7] + [-200] * f + [5, 9, 11, 13, 2]] * b)
  labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - 3, ids, -100)
  lay = layout_batch(ids, labels, np.ones_like(ids), mask, st,
                     max_len=ids.shape[1] - f + f * st.max_frame_tokens)
  px = np.asarray(random_video(jax.random.PRNGKey(0), b, f))
  teacher = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (
      b, f, st.target_grid ** 2, cfg.distill.teacher_hidden)))
  return dict(lay, pixels=px, mask=mask, teacher=teacher,
              teacher_valid=mask.reshape(b, f, -1).max(-1) > 0)


def param_shapes(cfg: PandaConfig) -> dict:
  batch = jax.tree.map(jnp.asarray, make_batch(cfg))
  shapes = jax.eval_shape(VideoPanda(cfg).init, jax.random.PRNGKey(0), batch)
  return {k: v.shape for k, v in flatten(nn.unbox(shapes['params'])).items()}


def count(shapes: dict) -> int:
  return sum(int(np.prod(s)) for s in shapes.values())


@pytest.fixture(scope='module')
def default_shapes():
  return param_shapes(CFG)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_parameter_count_drops_by_the_removed_modules(name, default_shapes):
  _, _, removed, absent = VARIANTS[name]
  shapes = param_shapes(variant(name))
  for prefix in absent:
    gone = [k for k in default_shapes if k.startswith(prefix)]
    assert gone and not any(k.startswith(prefix) for k in shapes), (prefix, gone)
    # The closed-form size of what goes is what the default model holds there.
  assert count(default_shapes) - count(shapes) == removed
  assert count({k: s for k, s in default_shapes.items()
                if any(k.startswith(p) for p in absent)}) == removed
  # Everything else keeps its shape.
  assert all(default_shapes[k] == s for k, s in shapes.items())


def random_variables(cfg: PandaConfig, batch: dict, seed: int = 0) -> dict:
  """Random parameters of the model's shapes (no init compile); BN running mean 0, var 1."""
  shapes = nn.unbox(jax.eval_shape(VideoPanda(cfg).init, jax.random.PRNGKey(0), batch))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                        shapes['params'])
  stats = flatten(shapes.get('batch_stats', {}))
  stats = {k: jnp.ones(s.shape) if k.endswith('var') else jnp.zeros(s.shape)
           for k, s in stats.items()}
  return {'params': params, 'batch_stats': unflatten(stats)}


# Train steps compile for seconds each: three combinations run every switch once.
COMBOS = [('lste_off', 'row_off', 'avgpool', 'mse'), ('gstra_off', 'lsd_before', 'no_distill'),
          ('fsra_off', 'no_downsample')]


def combined(names) -> PandaConfig:
  stab, distill = {}, {}
  for n in names:
    stab.update(VARIANTS[n][0])
    distill.update(VARIANTS[n][1])
  return dataclasses.replace(CFG, stab=dataclasses.replace(CFG.stab, dropout=0.0, **stab),
                             distill=dataclasses.replace(CFG.distill, **distill))


@pytest.mark.parametrize('names', COMBOS, ids=['+'.join(c) for c in COMBOS])
def test_forward_and_train_step_run(names, default_shapes, tmp_path):
  cfg = combined(names)
  model = VideoPanda(cfg)
  batch = jax.tree.map(jnp.asarray, make_batch(cfg))
  v = random_variables(cfg, batch)
  # The switches remove what each removes alone.
  assert count(default_shapes) - count(flatten(jax.tree.map(np.shape, v['params']))) == sum(
      VARIANTS[n][2] for n in names)
  optim = optim_config()
  labels = param_labels(flatten(v['params']).keys(), optim)
  tx, schedules = make_optimizer(labels, optim, 10)
  state = init_state(v['params'], v['batch_stats'], labels, tx, jax.random.PRNGKey(1))
  step = jax.jit(make_train_step(model, labels, tx, schedules))
  new, m = step(state, batch)
  m = jax.device_get(m)
  assert int(m['finite']) == 1 and np.isfinite(m['loss']) and m['ce'] > 0
  if cfg.distill.loss == 'none':
    assert m['distill'] == 0 and m['loss'] == m['ce']
  else:
    assert m['distill'] > 0 and np.isclose(m['loss'], m['ce'] + m['distill'], rtol=1e-5)
  before, after = flatten(state.params), flatten(new.params)
  # GSTRA's key bias shifts every score of a head alike: softmax gives it no gradient.
  still = [k for k in before if np.array_equal(before[k], after[k])
           and not k.endswith('gstra/k_bias')]
  assert not still, f'parameters without a gradient: {still}'
  # The trained state checkpoints and restores (without LSTE there are no BatchNorm
  # statistics: the demo's `no_lste` run once failed at its first save, "Found empty item").
  from panda_jax.train import checkpoint as ckpt
  mngr = ckpt.manager(tmp_path, 1, 2, async_save=False)
  ckpt.save(mngr, 1, new, {'next_index': 3})
  mngr.wait_until_finished()
  shardings = jax.tree.map(lambda x: x.sharding, new)
  back, data = ckpt.restore(mngr, 1, state, shardings)
  assert data[ckpt.PROCESSES] == [{'next_index': 3}], data
  for got, want in ((back.params, new.params), (back.batch_stats, new.batch_stats),
                    (back.opt_state, new.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert int(back.step) == int(new.step) == 1
  from panda_jax import workdir as workdir_lib
  step, params, stats = workdir_lib.restore_variables(tmp_path)
  assert step == 1 and bool(stats) == ('lste_off' not in names)
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(new.params))


@pytest.fixture(scope='module')
def stab_setup(tiny_variables, tiny_apply):
  """Default tiny variables, video and mask (frames: whole, letterboxed, odd crop, empty)."""
  _COMPILED[TINY] = tiny_apply
  px = random_video(jax.random.PRNGKey(3), 1, 4)
  mask = jnp.asarray(box_mask(1, 4, BOXES))
  return tiny_variables, px, mask


_COMPILED = {}   # one compiled STAB function per config (TINY's is conftest's tiny_apply)


def _apply(cfg, variables, px, mask):
  if cfg not in _COMPILED:
    _COMPILED[cfg] = jax.jit(
        lambda v, x, m: VisualTokenizer(cfg).apply(v, x, m, return_hidden=True))
  return _COMPILED[cfg](variables, px, mask)


def _drop(variables, *names):
  p = dict(variables['params'])
  p['stab'] = {k: v for k, v in p['stab'].items() if k not in names}
  return dict(variables, params=p)


def _with(variables, **params):
  p = dict(variables['params'])
  p['stab'] = dict(p['stab'], **params)
  return dict(variables, params=p)


def test_default_path_is_unchanged(stab_setup, tiny_apply):
  """Switches spelt out at their defaults give the same bits as the default config, and the
  released model's golden cases still pass."""
  v, px, mask = stab_setup
  explicit = dataclasses.replace(TINY, lste=True, gstra=True, fsra=True, row_token=True,
                                 downsample='lsd', lsd_position='after')
  assert explicit == TINY
  a = tiny_apply(v, px, mask)
  b = jax.jit(lambda v, x, m: VisualTokenizer(explicit).apply(v, x, m, return_hidden=True))(
      v, px, mask)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  assert DistillConfig().loss == 'cosine' and StabConfig().max_frame_tokens == 273
  # The released STAB on a letterboxed video (crop, LSD, FSRA, fusion, rows); tests/test_golden.py
  # checks every case, the whole model's included.
  rows = golden.check_case(golden.case_path('stab_letterbox_eval'))
  assert rows and all(ok for *_, ok in rows), rows


def test_gstra_or_fsra_off_is_the_fusion_saturated_to_the_other(stab_setup):
  """gstra=False is the released fusion with w = sigmoid(balance) = 1 (FSRA token only);
  fsra=False the one with w = 0 (GSTRA token only)."""
  v, px, mask = stab_setup
  big = jnp.full((C,), 200.0)
  for field, sign, drop in (('gstra', 1.0, ('gstra', 'balance')),
                            ('fsra', -1.0, ('fsra', 'fsra_query', 'balance'))):
    want = _apply(TINY, _with(v, balance=sign * big), px, mask)
    got = _apply(dataclasses.replace(TINY, **{field: False}), _drop(v, *drop), px, mask)
    np.testing.assert_allclose(got['tokens'], want['tokens'], rtol=1e-5, atol=1e-5,
                               err_msg=field)


def test_avgpool_is_lsd_without_its_attention_update(stab_setup):
  v, px, mask = stab_setup
  lsd = dict(v['params']['stab']['lsd'])
  lsd['out'] = jax.tree.map(jnp.zeros_like, lsd['out'])
  want = _apply(TINY, _with(v, lsd=lsd), px, mask)
  got = _apply(dataclasses.replace(TINY, downsample='avgpool'), _drop(v, 'lsd'), px, mask)
  np.testing.assert_allclose(got['tokens'], want['tokens'], rtol=1e-4, atol=1e-5)


def test_row_token_off_drops_the_row_slots(stab_setup):
  v, px, mask = stab_setup
  cfg = dataclasses.replace(TINY, row_token=False)
  want = _apply(TINY, v, px, mask)
  got = _apply(cfg, _drop(v, 'row_token'), px, mask)
  assert got['tokens'].shape[2] == cfg.max_frame_tokens == 1 + 4 * 4
  hw = np.asarray(got['patch_hw'])
  np.testing.assert_array_equal(got['length'], 1 + hw[..., 0] * hw[..., 1])
  keep = np.asarray(want['valid']) & (np.asarray(
      frame_layout(want['patch_hw'], TINY.lsd_grid)['index']) != TINY.lsd_grid ** 2 + 1)
  for f in range(4):
    np.testing.assert_allclose(np.asarray(got['tokens'])[0, f, :got['length'][0, f]],
                               np.asarray(want['tokens'])[0, f][keep[0, f]], rtol=1e-6,
                               atol=1e-6)


def test_lste_off_feeds_the_patch_embeddings_on(stab_setup):
  """Without LSTE the frame tokens are the LSD of the raw patch embeddings."""
  v, px, mask = stab_setup
  cfg = dataclasses.replace(TINY, lste=False)
  got = _apply(cfg, _drop(v, 'lste'), px, mask)
  want = _apply(TINY, v, px, mask)
  assert got['tokens'].shape == want['tokens'].shape
  np.testing.assert_array_equal(got['length'], want['length'])
  assert not np.allclose(got['hidden'], want['hidden'])


def test_no_downsampling_keeps_the_patch_grid_and_upsamples_targets():
  cfg = dataclasses.replace(TINY, downsample='none')
  assert (cfg.lsd_grid, cfg.target_grid, cfg.max_frame_tokens) == (8, 4, 1 + 8 * 9)
  mask = box_mask(1, 4, BOXES)
  ids = np.array([[1] + [-200] * 4 + [5]])
  lay = layout_batch(ids, None, np.ones_like(ids), mask, cfg, max_len=4 * 73 + 2)
  # Patch grids: 8x8, 4x8 (rows 2-5), 8x6 (columns 1-6), the empty frame's 4x4.
  np.testing.assert_array_equal(lay['patch_hw'][0], [[8, 8], [4, 8], [8, 6], [4, 4]])
  np.testing.assert_array_equal(lay['frame_len'][0], [1 + 8 * 9, 1 + 4 * 9, 1 + 8 * 7, 1 + 4 * 5])
  # Each patch's target is the teacher cell (of the 4x4 grid) that contains it.
  for f, (r0, c0) in enumerate([(0, 0), (2, 0), (0, 1), (0, 0)]):
    h, w = lay['patch_hw'][0, f]
    q = np.arange(h * w)
    want = (r0 + q // w) // 2 * 4 + (c0 + q % w) // 2
    np.testing.assert_array_equal(lay['teacher_cell'][0, f, :h * w], want)
    assert lay['patch_valid'][0, f].sum() == h * w


def test_lsd_before_runs_on_the_downsampled_grid_and_crops_whole_windows(stab_setup):
  v, px, mask = stab_setup
  cfg = dataclasses.replace(TINY, lsd_position='before')
  got = _apply(cfg, v, px, mask)
  want = _apply(TINY, v, px, mask)
  # Same geometry (the crop floored to windows), different tokens.
  np.testing.assert_array_equal(got['patch_hw'], want['patch_hw'])
  np.testing.assert_array_equal(got['length'], want['length'])
  assert np.isfinite(np.asarray(got['tokens'])).all()
  assert not np.allclose(got['hidden'], want['hidden'])


def test_mse_loss_is_the_mean_squared_error_over_valid_patches_and_counted_frames():
  rng = np.random.default_rng(0)
  s, t = rng.standard_normal((2, 2, 3, 5, 4))
  pv = rng.random((2, 3, 5)) > 0.3
  pv[0, 1] = False                                   # no valid patch: not counted
  fv = np.array([[True, True, False], [True, True, True]])
  loss, frame = mse_distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(pv), jnp.asarray(fv))
  err = ((s - t) ** 2).mean(-1)
  want_frame = (err * pv).sum(-1) / np.maximum(pv.sum(-1), 1)
  counted = fv & pv.any(-1)
  np.testing.assert_allclose(frame, want_frame, rtol=1e-6)
  np.testing.assert_allclose(loss, want_frame[counted].mean(), rtol=1e-6)
  # The same frames count as for the cosine loss.
  cl, cf = cosine_distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(pv), jnp.asarray(fv))
  np.testing.assert_allclose(cl, np.asarray(cf)[counted].mean(), rtol=1e-6)


@pytest.mark.parametrize('fields,match', [
    (dict(gstra=False, fsra=False), 'no context token'),
    (dict(downsample='max'), "downsample='max'"),
    (dict(lsd_position='middle'), "lsd_position='middle'"),
    (dict(downsample='none', lsd_position='before'), 'no downsampling to move'),
])
def test_bad_combinations_are_rejected(fields, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **fields).validate()


def test_bad_distill_loss_is_rejected():
  with pytest.raises(ValueError, match="loss='l1'"):
    DistillConfig(loss='l1').validate()


def test_batch_spec_follows_the_switches():
  from panda_jax.config import resolve, train_config
  batch_spec = lambda c: resolve(c).batch
  c = train_config(1, 'tiny')
  base = batch_spec(c)
  assert base['patch_pos'][0][2] == 16 and 'teacher_pixels' in base
  c.model.stab.downsample = 'none'             # 8x8 tokens, targets on the teacher's 4x4 grid
  spec = batch_spec(c)
  assert spec['patch_pos'][0][2] == spec['teacher_cell'][0][2] == 64
  assert spec['teacher_pixels'] == base['teacher_pixels']
  c.train.teacher = 'cached'
  assert batch_spec(c)['teacher'][0][2:] == (16, c.model.teacher.hidden)
  c.model.distill.loss = 'none'                # no teacher at all
  assert not {'teacher', 'teacher_pixels'} & set(batch_spec(c))
  c.model.teacher.image_size = 112             # a teacher grid that matches nothing
  with pytest.raises(ValueError, match='does not match'):
    c.model.distill.loss = 'mse'
    batch_spec(c)
