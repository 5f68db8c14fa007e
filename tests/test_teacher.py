"""The LanguageBind video teacher beyond its golden case: clip grouping, sizes, conversion."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panda_jax.convert.common import ConversionError
from panda_jax.convert.teacher import convert_teacher
from panda_jax.models.teacher import TeacherConfig, VideoTeacher

# 2 x 2 patches per frame, clips of 4 frames, 3 layers (features from layer 2 of 3).
TINY = TeacherConfig(hidden=32, layers=3, heads=4, mlp=64, patch_size=14, image_size=28,
                     num_frames=4)
PLAIN = dataclasses.replace(TINY, temporal=False, activation='quick_gelu')


def _frames(key, b, f, cfg=TINY):
  return jax.random.normal(key, (b, f, cfg.image_size, cfg.image_size, 3))


def _init(cfg, frames, seed=0):
  """Random parameters (host-side: no compiled init), LayerNorm scales near one."""
  shapes = jax.eval_shape(VideoTeacher(cfg).init, jax.random.PRNGKey(0), frames)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    x = 0.1 * rng.standard_normal(a.shape).astype(np.float32)
    return x + 1 if getattr(path[-1], 'key', None) == 'scale' else x

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


def _run(cfg):
  model = VideoTeacher(cfg)
  return jax.jit(lambda v, x: model.apply(v, x))


def test_temporal_attention_mixes_frames_within_a_clip_only():
  x = _frames(jax.random.PRNGKey(0), 2, 8)          # 2 videos x 2 clips of 4 frames
  v = _init(TINY, x)
  run = _run(TINY)
  base = np.asarray(run(v, x))
  assert base.shape == (2, 8, TINY.num_patches, TINY.hidden)
  # Change frame 0 of video 0's second clip (frame 4).
  y = np.asarray(run(v, x.at[0, 4].add(1.0)))
  diff = np.abs(y - base).max(axis=(2, 3))           # [video, frame]
  np.testing.assert_array_equal(diff[0, :4], 0)      # the first clip does not see it
  np.testing.assert_array_equal(diff[1], 0)          # nor does the other video
  assert (diff[0, 4:] > 1e-3).all(), diff             # the whole second clip does


def test_plain_clip_teacher_keeps_frames_independent():
  x = _frames(jax.random.PRNGKey(0), 1, 8, PLAIN)
  v = _init(PLAIN, x)
  assert not any('temporal' in '/'.join(map(str, k))
                 for k in jax.tree_util.tree_flatten_with_path(v)[0])
  run = _run(PLAIN)
  base = np.asarray(run(v, x))
  diff = np.abs(np.asarray(run(v, x.at[0, 4].add(1.0))) - base).max(axis=(2, 3))[0]
  assert diff[4] > 1e-3
  np.testing.assert_array_equal(np.delete(diff, 4), 0)
  # Any number of frames works without temporal attention.
  assert run(v, x[:, :3]).shape == (1, 3, PLAIN.num_patches, PLAIN.hidden)


def test_features_are_the_selected_hidden_state_without_cls():
  x = _frames(jax.random.PRNGKey(3), 1, 4)
  full = dataclasses.replace(TINY, select_layer=-1)
  v = _init(full, x)
  out = jax.jit(lambda v, x: VideoTeacher(full).apply(v, x, output_hidden_states=True))(v, x)
  hs = out['hidden_states']
  assert hs.shape == (TINY.layers + 1, 1, 4, 1 + TINY.num_patches, TINY.hidden)
  np.testing.assert_array_equal(out['features'], hs[-1][:, :, 1:])
  # select_layer=-2 builds and runs the first L - 1 layers only: same values as hs[-2].
  v2 = {'params': {k: w for k, w in v['params'].items() if k != f'layers_{TINY.layers - 1}'}}
  feats = _run(TINY)(v2, x)
  np.testing.assert_allclose(feats, hs[-2][:, :, 1:], rtol=1e-6, atol=1e-6)
  shapes = jax.eval_shape(VideoTeacher(TINY).init, jax.random.PRNGKey(0), x)['params']
  assert f'layers_{TINY.layers - 2}' in shapes and f'layers_{TINY.layers - 1}' not in shapes


def test_frames_must_fill_whole_clips():
  x = _frames(jax.random.PRNGKey(0), 1, 6)
  with pytest.raises(ValueError, match='multiple of the teacher clip length'):
    jax.eval_shape(VideoTeacher(TINY).init, jax.random.PRNGKey(0), x)


def _count(cfg, frames=8):
  x = jax.ShapeDtypeStruct((1, frames, cfg.image_size, cfg.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(VideoTeacher(cfg).init, jax.random.PRNGKey(0), x)
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes['params'])))


def test_parameter_count_of_languagebind_vit_l14():
  # By hand, C = 1024, MLP = 4096, 16 x 16 patches of 14 px, 8 frames:
  #   embeddings: patch conv 3*14*14*C = 602,112 (no bias) + CLS C = 1,024
  #               + positions 257*C = 263,168 + pre-LayerNorm 2C = 2,048      =    868,352
  #   spatial block per layer: attention 4*(C*C + C) = 4,198,400, two LayerNorms 4C = 4,096,
  #               MLP C*4C + 4C + 4C*C + C = 8,393,728                          = 12,596,224
  #   temporal step per layer: table 8*C = 8,192, LayerNorm 2C = 2,048,
  #               attention 4,198,400                                           =  4,208,640
  # hidden_states[-2] needs 23 of the 24 layers (no post-LayerNorm):
  #   868,352 + 23 * (12,596,224 + 4,208,640)                                   = 387,380,224
  cfg = TeacherConfig()
  assert cfg.run_layers == 23
  assert _count(cfg) == 387_380_224
  # All 24 layers: 868,352 + 24 * 16,804,864 = 404,185,088.
  assert _count(dataclasses.replace(cfg, select_layer=-1)) == 404_185_088
  # The plain CLIP ViT-L/14 with all layers: 868,352 + 24 * 12,596,224 = 303,177,728, which is
  # OpenAI CLIP ViT-L/14's 303,179,776 vision parameters minus the post-LayerNorm's 2,048.
  plain = dataclasses.replace(cfg, temporal=False, activation='quick_gelu', select_layer=-1)
  assert _count(plain) == 303_177_728


def test_every_parameter_has_distinct_logical_names():
  x = jax.ShapeDtypeStruct((1, 4, TINY.image_size, TINY.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(VideoTeacher(TINY).init, jax.random.PRNGKey(0), x)['params']
  leaves = jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]
  assert len(leaves) == 5 + TINY.run_layers * 27   # embeddings, then 27 per layer
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), path
    names = leaf.names
    assert len(names) == leaf.value.ndim and None not in names, (path, names)
    assert len(set(names)) == len(names), (path, names)
    assert all(n.startswith('teacher_') for n in names), (path, names)


def _torch_state(cfg, prefix='vision_model.', layers=None, seed=0):
  """A random checkpoint with LanguageBind's names and PyTorch layouts."""
  rng = np.random.default_rng(seed)
  c, m, p = cfg.hidden, cfg.mlp, cfg.patch_size
  r = lambda *s: rng.standard_normal(s).astype(np.float32)
  e = prefix + 'embeddings.'
  st = {e + 'class_embedding': r(c), e + 'patch_embedding.weight': r(c, 3, p, p),
        e + 'position_embedding.weight': r(1 + cfg.num_patches, c),
        e + 'position_ids': np.arange(1 + cfg.num_patches)[None],
        prefix + 'pre_layrnorm.weight': r(c), prefix + 'pre_layrnorm.bias': r(c),
        prefix + 'post_layernorm.weight': r(c), prefix + 'post_layernorm.bias': r(c)}
  for i in range(cfg.layers if layers is None else layers):
    t = f'{prefix}encoder.layers.{i}.'
    attns = ['self_attn'] + (['temporal_attn'] if cfg.temporal else [])
    norms = ['layer_norm1', 'layer_norm2'] + (['temporal_layer_norm1'] if cfg.temporal else [])
    for a in attns:
      for n in ('q', 'k', 'v', 'out'):
        st[f'{t}{a}.{n}_proj.weight'] = r(c, c)
        st[f'{t}{a}.{n}_proj.bias'] = r(c)
    for n in norms:
      st[f'{t}{n}.weight'], st[f'{t}{n}.bias'] = r(c), r(c)
    st[t + 'mlp.fc1.weight'], st[t + 'mlp.fc1.bias'] = r(m, c), r(m)
    st[t + 'mlp.fc2.weight'], st[t + 'mlp.fc2.bias'] = r(c, m), r(c)
    if cfg.temporal:
      st[t + 'temporal_embedding'] = r(1, cfg.num_frames, c)
  return st


@pytest.mark.parametrize('prefix', ['vision_model.', 'model.video_teacher.', ''])
def test_converter_layouts_and_prefixes(prefix):
  st = _torch_state(TINY, prefix)
  st['text_model.embeddings.token_embedding.weight'] = np.zeros((5, 4))  # outside the tower
  if not prefix:
    del st['text_model.embeddings.token_embedding.weight']
  p = convert_teacher(st, TINY, prefix=prefix)['params']
  h, d = TINY.heads, TINY.head_dim
  t = prefix + 'encoder.layers.1.'
  w = st[t + 'temporal_attn.q_proj.weight']
  np.testing.assert_array_equal(p['layers_1']['temporal_attn']['q']['kernel'],
                                w.T.reshape(TINY.hidden, h, d))
  w = st[t + 'self_attn.out_proj.weight']
  np.testing.assert_array_equal(p['layers_1']['attn']['out']['kernel'],
                                w.T.reshape(h, d, TINY.hidden))
  np.testing.assert_array_equal(p['layers_1']['fc1']['kernel'], st[t + 'mlp.fc1.weight'].T)
  np.testing.assert_array_equal(p['layers_1']['temporal_embed'], st[t + 'temporal_embedding'][0])
  w = st[prefix + 'embeddings.patch_embedding.weight']
  np.testing.assert_array_equal(p['patch_embed']['kernel'], w.transpose(2, 3, 1, 0))
  # Only the layers up to hidden_states[-2]; the last layer and post-LayerNorm are dropped.
  assert sorted(k for k in p if k.startswith('layers_')) == ['layers_0', 'layers_1']
  x = _frames(jax.random.PRNGKey(0), 1, 4)
  assert _run(TINY)({'params': p}, x).shape == (1, 4, 4, TINY.hidden)


def test_converter_reads_plain_clip_names():
  st = _torch_state(PLAIN)
  p = convert_teacher(st, PLAIN)['params']
  assert 'temporal_attn' not in p['layers_0']


def test_converter_names_missing_and_unexpected_tensors():
  st = _torch_state(TINY)
  del st['vision_model.encoder.layers.1.temporal_attn.k_proj.bias']
  st['vision_model.encoder.layers.0.temporal_mlp.fc1.weight'] = np.zeros((4, 4))
  with pytest.raises(ConversionError) as e:
    convert_teacher(st, TINY)
  msg = str(e.value)
  assert 'missing (1): vision_model.encoder.layers.1.temporal_attn.k_proj.bias' in msg
  assert 'unexpected (1): vision_model.encoder.layers.0.temporal_mlp.fc1.weight' in msg


def test_converter_flags_extra_layers_and_the_wrong_teacher_kind():
  # A deeper checkpoint than the config: the layers past cfg.layers are unexpected.
  with pytest.raises(ConversionError, match=r'unexpected \(\d+\): vision_model\.encoder\.layers\.3\.'):
    convert_teacher(_torch_state(TINY, layers=4), TINY)
  # LanguageBind weights into a plain CLIP config, and the other way round.
  with pytest.raises(ConversionError, match='use TeacherConfig\\(temporal=True\\)'):
    convert_teacher(_torch_state(TINY), PLAIN)
  with pytest.raises(ConversionError, match='use TeacherConfig\\(temporal=False\\)'):
    convert_teacher(_torch_state(PLAIN), TINY)


def test_converter_reports_sizes_that_disagree_with_the_config():
  wide = dataclasses.replace(TINY, mlp=96)
  with pytest.raises(ConversionError, match='fc1/kernel: checkpoint gives \\(32, 64\\), model '
                                            'expects \\(32, 96\\)'):
    convert_teacher(_torch_state(TINY), wide)
