"""The frozen distillation teacher with its parameters, sharded: the one the train step runs
(online distillation) and the one feature extraction runs."""

from __future__ import annotations

import jax
import numpy as np

from panda_jax import sharding
from panda_jax.models.teacher import VideoTeacher


def create_teacher(run, mesh, seed: int, frames: int, checkpoint: str = '',
                   prefix: str = 'vision_model.'):
  """-> (module, params, param shardings) of the teacher `run.teacher` (a resolved `Run`),
  loaded from `checkpoint` (a LanguageBind video checkpoint directory) or, for tiny runs only,
  randomly initialised from `seed + 1`."""
  tc = run.teacher
  # Frozen, so kept in the compute dtype: its matmuls cast weights to it anyway, so bfloat16 at
  # full size halves its memory and changes only the rounding of its LayerNorm parameters.
  dt = run.dtype
  teacher = VideoTeacher(tc, dtype=dt, param_dtype=dt)
  x = np.zeros((1, frames, tc.image_size, tc.image_size, 3), np.float32)
  params, sh = sharding.init_sharded(teacher.init, mesh, jax.random.PRNGKey(seed + 1), x,
                                     rules=run.rules)
  if checkpoint:
    from panda_jax import storage
    from panda_jax.convert import hf_io
    from panda_jax.convert.teacher import convert_teacher
    # A released Hugging Face directory, local or gs:// (copied to the local cache once).
    conv = convert_teacher(hf_io.load_tensors(storage.local_copy(checkpoint)), tc,
                           prefix=prefix)
    params = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a, np.float32).astype(dt), s),
                          conv, sh)
  elif run.size != 'tiny':
    raise ValueError('init.teacher is empty: distillation needs the LanguageBind video '
                     'teacher (a random teacher is only allowed for tiny runs)')
  return teacher, params['params'], sh['params']
