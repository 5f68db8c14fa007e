"""Stage 2 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run.

  python -m panda_jax.main --config=configs/stage2.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage2.py:tiny --workdir=DIR
"""

from panda_jax.config import train_config


def get_config(arg: str = ''):
  config = train_config(2, arg)
  config.lock()
  return config
