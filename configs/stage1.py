"""Stage 1 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run.

  python -m panda_jax.main --config=configs/stage1.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage1.py:tiny --workdir=DIR
"""

from panda_jax.config import train_config


def get_config(arg: str = ''):
  config = train_config(1, arg)
  config.lock()
  return config
