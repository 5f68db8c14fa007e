"""The train step on a 2 x 2 x 2 mesh of fake devices equals the same step on one device."""

import jax
import numpy as np
import pytest

from panda_jax import config as config_lib
from panda_jax import sharding
from panda_jax.models.panda import VideoPanda
from panda_jax.train import loop
from panda_jax.train.optimizer import flatten
from panda_jax.train.step import make_train_step
from test_loop import _batch


def _one_step(sizes, devices):
  c = config_lib.train_config(2, 'tiny')
  c.data.max_len = 160
  c.train.steps = 10
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = sizes
  mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  cfg = config_lib.panda_config(c.model)
  model = VideoPanda(cfg)
  state, state_sh, labels, tx, schedules = loop.create_state(c, mesh, model,
                                                             jax.random.PRNGKey(0))
  teacher, tparams, tsh = loop.create_teacher(c, mesh)
  spec = loop.batch_spec(c)
  batch_sh = {k: sharding.batch_sharding(mesh, len(s)) for k, (s, _) in spec.items()}
  step = jax.jit(make_train_step(model, labels, tx, schedules, teacher=teacher),
                 in_shardings=(state_sh, batch_sh, tsh), out_shardings=(state_sh, None))
  host = _batch(c, 0)
  with jax.set_mesh(mesh):
    new, metrics = step(state, loop._global_batch(host, batch_sh), tparams)
  leaf = new.params['llm']['layers']['mlp']['up']['kernel']
  return (flatten(jax.device_get(new.params)), jax.device_get(metrics),
          len(leaf.sharding.device_set))


@pytest.mark.slow
def test_2x2x2_mesh_step_equals_single_device():
  one, m1, n1 = _one_step((1, 1, 1), jax.devices()[:1])
  eight, m8, n8 = _one_step((2, 2, 2), jax.devices()[:8])
  assert (n1, n8) == (1, 8)
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['grad_norm'], m8['grad_norm'], rtol=1e-4)
  for k in one:
    # Adam's first step moves each weight by about lr * sign(grad): allow float noise there.
    np.testing.assert_allclose(one[k], eight[k], rtol=1e-4, atol=2e-4, err_msg=k)
