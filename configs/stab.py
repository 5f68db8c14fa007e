"""The STAB + projector alone on a generated letterboxed video, printing each frame's tokens.

  python -m panda_jax.main --config=configs/stab.py          # released 7B widths
  python -m panda_jax.main --config=configs/stab.py:tiny     # tiny widths, seconds
"""

import ml_collections

from panda_jax.config import model_config


def get_config(arg: str = ''):
  size = arg or '7b'
  config = ml_collections.ConfigDict()
  config.mode = 'stab'
  config.seed = 0
  config.model = model_config(size)
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # The generated clip: moving shapes on a width x height canvas, letterboxed to a square.
  config.demo = ml_collections.ConfigDict(dict(
      batch=1, frames=8, width=16, height=9, runs=3))
  config.lock()
  return config
