"""The train step on a 2 x 2 x 2 mesh of fake devices equals the same step on one device:
gradients, Adam moments, BatchNorm statistics and parameters over several steps, with the
large parameters really sharded."""

import jax
import numpy as np
import pytest

from panda_jax import config as config_lib
from panda_jax import sharding
from panda_jax.models.panda import VideoPanda
from panda_jax.teacher.model import create_teacher
from panda_jax.train import loop
from panda_jax.tree import flatten
from panda_jax.train.step import make_train_step
from test_loop import _batch
from test_train_step import adam_moments, assert_trees_close

STEPS = 3
LR = 2e-3           # the tiny stage-2 rate


def _setup(sizes, devices):
  """The tiny stage-2 state, its shardings, the jitted step (returning gradients) and the
  teacher on a `sizes` = (data, fsdp, tensor) mesh of `devices`."""
  c = config_lib.train_config(2, 'tiny')
  c.data.max_len = 160
  c.train.steps = 10
  assert c.optim.lr == LR
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = sizes
  mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  run = config_lib.resolve(c)
  model = VideoPanda(run.model)
  state, state_sh, labels, tx, schedules = loop.create_state(c, run, mesh, model,
                                                             jax.random.PRNGKey(0))
  teacher, tparams, tsh = create_teacher(run, mesh, c.seed, c.data.frames)
  spec = run.batch
  batch_sh = {k: sharding.batch_sharding(mesh, len(s)) for k, (s, _) in spec.items()}
  step = jax.jit(make_train_step(model, labels, tx, schedules, teacher=teacher,
                                 return_grads=True),
                 in_shardings=(state_sh, batch_sh, tsh), out_shardings=(state_sh, None))
  return c, mesh, state, state_sh, step, batch_sh, tparams


def _host(state, metrics):
  grads = metrics.pop('grads')
  return jax.device_get({
      'grads': flatten(grads), 'moments': adam_moments(state.opt_state),
      'stats': flatten(state.batch_stats), 'params': flatten(state.params), 'metrics': metrics})


@pytest.mark.slow
def test_2x2x2_mesh_steps_equal_single_device():
  """Each of STEPS steps (different batches, dropout on) starts both runs from the one-device
  run's state, so the comparison stays tight instead of measuring drift."""
  c, mesh1, s1, _, step1, bsh1, tp1 = _setup((1, 1, 1), jax.devices()[:1])
  _, mesh8, s8, sh8, step8, bsh8, tp8 = _setup((2, 2, 2), jax.devices()[:8])
  assert c.model.stab.dropout > 0
  for i in range(STEPS):
    what = f'step {i + 1}'
    host = _batch(c, i)
    with jax.set_mesh(mesh8):
      new8, m8 = step8(jax.device_put(s1, sh8), loop._global_batch(host, bsh8), tp8)
    with jax.set_mesh(mesh1):
      s1, m1 = step1(s1, loop._global_batch(host, bsh1), tp1)
    a, b = _host(new8, m8), _host(s1, m1)
    np.testing.assert_allclose(a['metrics']['loss'], b['metrics']['loss'], rtol=1e-5)
    np.testing.assert_allclose(a['metrics']['grad_norm'], b['metrics']['grad_norm'], rtol=1e-4)
    assert_trees_close(a['grads'], b['grads'], 1e-4, f'{what} gradient', nonzero=i > 0)
    assert_trees_close(a['moments'], b['moments'], 1e-4, f'{what} Adam moment')
    assert_trees_close(a['stats'], b['stats'], 1e-5, f'{what} BatchNorm statistic')
    # Adam divides each gradient element by its own scale, so a parameter inherits the relative
    # error of its gradient element, which is large for the tiny ones (near Adam's eps, a
    # rounding difference in the gradient moves the update by a good fraction of lr): the
    # gradients and moments above are the tight comparisons, parameters agree to ~lr / 10.
    assert_trees_close(a['params'], b['params'], 1e-5, f'{what} parameter', atol=0.1 * LR)
  state8 = new8

  # The large parameters (and their Adam moments) are split over the mesh, not replicated: the
  # device count of an array says nothing (a replicated array spans all 8 devices too).
  params = flatten(state8.params)
  moments = adam_moments(state8.opt_state)
  large = sorted(params, key=lambda k: -params[k].size)[:8]
  for k in large:
    spec = params[k].sharding.spec
    assert any(axis is not None for axis in spec), (k, params[k].shape, spec)
    assert not params[k].sharding.is_fully_replicated, k
    if f'mu/{k}' in moments:
      assert moments[f'mu/{k}'].sharding.spec == spec, (k, moments[f'mu/{k}'].sharding.spec)
  up = params['llm/layers/mlp/up/kernel']
  assert tuple(up.sharding.spec) == (None, 'fsdp', 'tensor'), up.sharding.spec
  # One device's shard of it is a quarter of the whole.
  assert up.addressable_shards[0].data.size * 4 == up.size
