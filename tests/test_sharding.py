"""Mesh construction and parameters born sharded over 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import TINY, random_video
from panda_jax import sharding
from panda_jax.models.stab import VisualTokenizer


def test_mesh_shape_fills_one_axis_and_rejects_bad_sizes():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(ValueError, match='3 is not a multiple'):
    sharding.mesh_shape({'data': 2, 'fsdp': -1, 'tensor': 2}, 3)
  with pytest.raises(ValueError, match='has 4 devices, but 8 are available'):
    sharding.mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='unknown mesh axes'):
    sharding.mesh_shape({'pipeline': 2}, 8)


def test_born_sharded_init_and_forward_match_one_device(tiny_variables):
  assert jax.device_count() == 8, 'conftest sets 8 fake CPU devices'
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  model = VisualTokenizer(TINY)
  px = random_video(jax.random.PRNGKey(0), 4, 4)
  mask = jnp.ones(px.shape[:-1])
  variables, shardings = sharding.init_sharded(model.init, mesh, jax.random.PRNGKey(0), px,
                                               mask)
  fc1 = variables['params']['projector']['fc1']['kernel']
  assert fc1.sharding.spec == P(None, 'tensor')
  fc2 = variables['params']['projector']['fc2']['kernel']
  assert fc2.sharding.spec == P('tensor', 'fsdp')
  assert len(fc2.addressable_shards) == 8
  assert fc2.addressable_shards[0].data.shape == (TINY.llm_hidden // 2, TINY.llm_hidden // 2)

  # Same numbers as an unsharded run, with the test's (fully random) weights placed sharded.
  placed = jax.device_put(tiny_variables, shardings)
  xs = jax.device_put(px, sharding.batch_sharding(mesh, px.ndim))
  ms = jax.device_put(mask, sharding.batch_sharding(mesh, mask.ndim))
  fwd = jax.jit(lambda v, x, m: model.apply(v, x, m)['tokens'])
  got = fwd(placed, xs, ms)
  want = fwd(tiny_variables, px, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_full_model_sharded_over_a_2x2x2_mesh_matches_one_device():
  from test_predict import CFG
  from panda_jax.data.assembly import layout_batch
  from panda_jax.models.panda import VideoPanda
  import flax.linen as nn
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  model = VideoPanda(CFG)
  f = 4
  px = random_video(jax.random.PRNGKey(0), 4, f)
  mask = np.ones(px.shape[:-1], np.float32)
  ids = np.array([[1, 7] + [-200] * f + [5, 9, 2]] * 4)
  labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - 2, ids, -100)
  lay = layout_batch(ids, labels, np.ones_like(ids), mask, CFG.stab, max_len=96)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()}, pixels=px, mask=jnp.asarray(mask),
               teacher=jax.random.normal(jax.random.PRNGKey(1), (4, f, 16, 16)),
               teacher_valid=jnp.ones((4, f), bool))
  variables, shardings = sharding.init_sharded(model.init, mesh, jax.random.PRNGKey(2), batch)
  q = variables['params']['llm']['layers']['attn']['q']['kernel']
  assert q.sharding.spec == P(None, 'fsdp', 'tensor', None)     # [layers, embed, heads, kv]
  in_sh = jax.tree.map(lambda a: sharding.batch_sharding(mesh, a.ndim), batch)
  sharded_batch = jax.device_put(batch, in_sh)

  def loss(v, b):
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
      return model.apply(v, b)['loss']

  with jax.set_mesh(mesh):
    got = jax.jit(loss, in_shardings=(shardings, in_sh))(variables, sharded_batch)
  host = jax.device_get(variables)
  want = jax.jit(loss)(host, batch)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_batch_axes_come_from_the_rules_table():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert sharding.batch_axes() == ('data', 'fsdp') and sharding.batch_shards(mesh) == 4
  # The first rule for a name wins (as in flax's logical_to_mesh_axes).
  rules = (('batch', ('fsdp', 'tensor')),) + sharding.DEFAULT_RULES
  assert sharding.batch_axes(rules) == ('fsdp', 'tensor')
  assert sharding.batch_shards(mesh, rules) == 4
  assert sharding.batch_sharding(mesh, 3, rules).spec == P(('fsdp', 'tensor'), None, None)
  one = (('batch', 'tensor'),)
  assert sharding.batch_axes(one) == ('tensor',) and sharding.batch_shards(mesh, one) == 2
  assert sharding.batch_axes((('embed', 'fsdp'),)) == ()


def test_the_loop_and_resolve_take_the_batch_axes_from_configured_rules(tmp_path):
  from panda_jax import config as config_lib
  from panda_jax.train import loop
  c = config_lib.train_config(2, 'tiny')
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.train.batch_size = 4
  c.sharding_rules = [['batch', ['data', 'fsdp', 'tensor']]] + [
      list(r) for r in sharding.DEFAULT_RULES if r[0] != 'batch']
  # Refused before anything compiles: 4 rows cannot be cut into 8 pieces.
  with pytest.raises(ValueError, match=r'data x fsdp x tensor = 8 times train.accum_steps=1'):
    loop.train(c, str(tmp_path), iter(()))
  c.sharding_rules = [['batch', None]]
  with pytest.raises(ValueError, match='map "batch" to no mesh axis'):
    config_lib.resolve(c)
  c.sharding_rules = [['batch', 'pods']]
  with pytest.raises(ValueError, match=r"unknown mesh axes \['pods'\]"):
    config_lib.resolve(c)
