"""STAB + projector behaviour beyond the golden cases: geometry, static shapes, modes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, box_mask, random_video
from panda_jax.models.stab import (SingleQueryAttention, StabConfig, VisualTokenizer,
                                   crop_boxes, frame_layout)


def test_parameter_count_at_7b_is_the_papers_45m():
  cfg = StabConfig()
  model = VisualTokenizer(cfg)
  px = jax.ShapeDtypeStruct((1, 8, 448, 448, 3), jnp.float32)
  mk = jax.ShapeDtypeStruct((1, 8, 448, 448), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), px, mk)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes['params'])))
  assert count == 45_066_578
  assert cfg.max_frame_tokens == 273


def _slow_layout(h, w, s):
  """The reference's sequence, written out: [ctx] + for each row: w patches then <row>."""
  seq = [('ctx', None)]
  for r in range(h):
    seq += [('patch', r * s + c) for c in range(w)] + [('row', None)]
  return seq


@pytest.mark.parametrize('h,w', [(8, 8), (4, 8), (8, 3), (1, 1), (0, 0), (5, 7)])
def test_frame_layout_matches_written_out_sequence(h, w):
  s = 8
  lay = frame_layout(np.array([h, w]), s, xp=np)
  seq = _slow_layout(h, w, s)
  n = len(seq)
  assert lay['length'] == n
  assert lay['valid'][:n].all() and not lay['valid'][n:].any()
  for p, (kind, cell) in enumerate(seq):
    idx = lay['index'][p]
    if kind == 'ctx':
      assert idx == 0 and lay['patch'][p] == -1
    elif kind == 'row':
      assert idx == s * s + 1 and lay['patch'][p] == -1
    else:
      assert idx == 1 + cell and lay['patch'][p] == cell
  # The device version computes the same map.
  dev = frame_layout(jnp.array([h, w]), s)
  for k in lay:
    np.testing.assert_array_equal(np.asarray(dev[k]), lay[k])


def test_crop_boxes_is_the_bounding_box_of_valid_patches():
  rng = np.random.default_rng(0)
  masks, want = [], []
  for _ in range(40):
    m = np.zeros((8, 8), bool)
    r0, c0 = rng.integers(0, 8, 2)
    r1, c1 = rng.integers(r0 + 1, 9), rng.integers(c0 + 1, 9)
    m[r0:r1, c0:c1] = True
    masks.append(m)
    want.append((r0, c0, r1 - r0, c1 - c0))
  masks.append(np.zeros((8, 8), bool))       # all padding: top-left empty_patches square
  want.append((0, 0, 3, 3))
  got = crop_boxes(jnp.asarray(np.stack(masks)), empty_patches=3)
  np.testing.assert_array_equal(np.stack([np.asarray(g) for g in got], -1), np.array(want))


def _slow_frame_sequence(variables, tokens_full, pmask, cfg, ctx_gstra, frame):
  """Crop, LSD, FSRA, fusion and rows for one frame with plain Python indexing."""
  p = variables['params']['stab']
  valid = np.asarray(pmask[frame] > 0)
  if valid.any():
    rows = np.where(valid.any(1))[0]
    cols = np.where(valid.any(0))[0]
    grid = tokens_full[frame, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  else:
    k = cfg.empty_frame_patches
    grid = tokens_full[frame, :k, :k]
  hs, ws = grid.shape[0] // 2, grid.shape[1] // 2
  grid = grid[:2 * hs, :2 * ws]
  win = grid.reshape(hs, 2, ws, 2, -1).transpose(0, 2, 1, 3, 4).reshape(hs, ws, 4, -1)
  attn = SingleQueryAttention(cfg.hidden, cfg.heads)
  lsd = attn.apply({'params': p['lsd']}, win.mean(2), win)
  flat = lsd.reshape(hs * ws, -1)
  fsra = attn.apply({'params': p['fsra']}, p['fsra_query'], flat)
  w = jax.nn.sigmoid(p['balance'])
  fused = (1 - w) * ctx_gstra + w * fsra
  mu, var = fused.mean(), fused.var()
  fused = (fused - mu) / np.sqrt(var + 1e-5) * p['fusion_norm']['scale'] + p['fusion_norm']['bias']
  context = fused @ p['fusion_proj']['kernel'] + p['fusion_proj']['bias']
  seq = [context]
  for r in range(hs):
    seq += [lsd[r, c] for c in range(ws)] + [p['row_token']]
  return np.stack(seq), (hs, ws)


@pytest.mark.parametrize('name,boxes', [
    ('letterbox', [(28, 84, 0, 112)] * 4),
    ('pillarbox', [(0, 112, 14, 98)] * 4),
    ('odd-offset-odd-size', [(14, 98, 28, 70), (14, 84, 0, 112), (0, 56, 42, 98),
                             (14, 56, 14, 42)]),
    ('empty-frames', [(0, 112, 0, 112), None, (28, 84, 0, 112), None]),
])
def test_sequences_match_explicit_crop(tiny_variables, tiny_apply, name, boxes):
  """Every frame's sequence equals cropping and downsampling it with plain indexing."""
  px = random_video(jax.random.PRNGKey(2), 1, 4)
  mask = box_mask(1, 4, boxes)
  out = tiny_apply(tiny_variables, px, jnp.asarray(mask))
  # Intermediate values the explicit construction starts from.
  model = VisualTokenizer(TINY)
  _, inter = model.apply(tiny_variables, px, jnp.asarray(mask),
                         capture_intermediates=True, mutable=['intermediates'])
  st = inter['intermediates']['stab']
  emb = st['patch_embed']['__call__'][0]
  lste = st['lste']['__call__'][0].reshape(emb.shape)
  ctx_g = st['gstra']['__call__'][0]
  g, p = TINY.grid, TINY.patch_size
  pmask = mask[0].reshape(4, g, p, g, p).mean((2, 4))
  for f in range(4):
    want, (hs, ws) = _slow_frame_sequence(tiny_variables, np.asarray(lste + emb), pmask, TINY,
                                          ctx_g[0], f)
    assert tuple(out['patch_hw'][0, f]) == (hs, ws)
    n = int(out['length'][0, f])
    assert n == len(want)
    np.testing.assert_allclose(out['hidden'][0, f, :n], want, atol=2e-5, rtol=1e-4)
    assert not np.any(out['tokens'][0, f, n:]), 'slots past the length must be zero'


def test_region_smaller_than_a_window_keeps_one_window(tiny_variables, tiny_apply):
  px = random_video(jax.random.PRNGKey(9), 1, 4)
  mask = box_mask(1, 4, [(14, 28, 14, 28)] * 4)   # one valid patch
  out = tiny_apply(tiny_variables, px, jnp.asarray(mask))
  np.testing.assert_array_equal(out['patch_hw'][0], [[1, 1]] * 4)
  np.testing.assert_array_equal(out['length'][0], [3] * 4)
  assert np.isfinite(np.asarray(out['tokens'])).all()


def test_one_compilation_serves_every_aspect_ratio(tiny_variables):
  model = VisualTokenizer(TINY)
  traces = []

  @jax.jit
  def run(v, x, m):
    traces.append(1)
    return model.apply(v, x, m)['length']

  px = random_video(jax.random.PRNGKey(3), 2, 4)
  lengths = set()
  for boxes in ([(0, 112, 0, 112)] * 4, [(28, 84, 0, 112)] * 4, [(0, 112, 28, 84)] * 4,
                [None] * 4):
    lengths.add(tuple(np.asarray(run(tiny_variables, px, jnp.asarray(box_mask(2, 4, boxes))))
                      .ravel()))
  assert len(traces) == 1
  assert len(lengths) == 4


@pytest.mark.parametrize('frames', [8, 16])
def test_chunks_are_independent_in_inference(tiny_variables, tiny_apply, frames):
  """Longer videos are more chunks of 4: the first chunk's tokens do not change."""
  px = random_video(jax.random.PRNGKey(4), 1, frames)
  mask = jnp.ones(px.shape[:-1])
  long = tiny_apply(tiny_variables, px, mask)
  short = tiny_apply(tiny_variables, px[:, :4], mask[:, :4])
  assert long['tokens'].shape == (1, frames, TINY.max_frame_tokens, TINY.llm_hidden)
  np.testing.assert_allclose(long['tokens'][:, :4], short['tokens'], atol=1e-5, rtol=1e-5)


def test_frames_must_be_a_multiple_of_the_chunk(tiny_variables):
  px = random_video(jax.random.PRNGKey(5), 1, 6)
  with pytest.raises(ValueError, match='6 frames per video is not a multiple'):
    VisualTokenizer(TINY).apply(tiny_variables, px, jnp.ones(px.shape[:-1]))
  with pytest.raises(ValueError, match='expected \\[B, F, 112, 112, 3\\]'):
    VisualTokenizer(TINY).apply(tiny_variables, px[:, :4, :56], jnp.ones((1, 4, 56, 112)))


def test_exact_rewrites_equal_per_token_keys_and_values(tiny_variables):
  px = random_video(jax.random.PRNGKey(6), 2, 4)
  mask = jnp.asarray(box_mask(2, 4, [(28, 84, 0, 112), (0, 112, 14, 98), None,
                                     (0, 112, 0, 112)]))
  fast = VisualTokenizer(TINY).apply(tiny_variables, px, mask)
  slow = VisualTokenizer(dataclasses.replace(TINY, exact_rewrites=False)).apply(
      tiny_variables, px, mask)
  np.testing.assert_allclose(fast['tokens'], slow['tokens'], atol=1e-5, rtol=1e-5)


def _train_apply(cfg, variables, px, mask, **kw):
  return VisualTokenizer(cfg).apply(variables, px, mask, train=True, mutable=['batch_stats'],
                                    **kw)


def test_batch_norm_statistics_are_per_video_like_the_reference(tiny_variables):
  """Training mode: each video is normalised alone and the running statistics are updated
  once per video in order, as the reference's per-video tower calls do."""
  px = random_video(jax.random.PRNGKey(7), 2, 8) * jnp.array([1.0, 3.0])[:, None, None, None,
                                                                        None]
  mask = jnp.ones(px.shape[:-1])
  both, upd = _train_apply(TINY, tiny_variables, px, mask, deterministic=True)
  first, upd1 = _train_apply(TINY, tiny_variables, px[:1], mask[:1], deterministic=True)
  v2 = dict(tiny_variables, batch_stats=upd1['batch_stats'])
  second, upd2 = _train_apply(TINY, v2, px[1:], mask[1:], deterministic=True)
  np.testing.assert_allclose(both['tokens'][:1], first['tokens'], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(both['tokens'][1:], second['tokens'], atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               upd['batch_stats'], upd2['batch_stats'])
  # Whole-batch statistics are a different, explicit choice.
  pooled, _ = _train_apply(dataclasses.replace(TINY, bn_stats='batch'), tiny_variables, px,
                           mask, deterministic=True)
  assert not np.allclose(pooled['tokens'][:1], first['tokens'], atol=1e-3)


def test_dropout_follows_the_rng_and_is_off_in_inference(tiny_variables):
  px = random_video(jax.random.PRNGKey(8), 1, 4)
  mask = jnp.ones(px.shape[:-1])
  a, _ = _train_apply(TINY, tiny_variables, px, mask, rngs={'dropout': jax.random.PRNGKey(0)})
  b, _ = _train_apply(TINY, tiny_variables, px, mask, rngs={'dropout': jax.random.PRNGKey(0)})
  c, _ = _train_apply(TINY, tiny_variables, px, mask, rngs={'dropout': jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(a['tokens'], b['tokens'])
  assert not np.allclose(a['tokens'], c['tokens'])
  # Inference needs no rng and does not depend on one.
  VisualTokenizer(TINY).apply(tiny_variables, px, mask)


def test_parameters_carry_logical_axis_names():
  model = VisualTokenizer(TINY)
  px = jnp.zeros((1, 4, TINY.image_size, TINY.image_size, 3))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), px, px[..., 0])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape), x
