"""Stage 1 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run;
`:v5e-64`, `:v5p-64`, `:v6e-64` laid out for those slices (LAYOUTS).

  python -m panda_jax.main --config=configs/stage1.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage1.py:tiny --workdir=DIR
  python -m panda_jax.main --config=configs/stage1.py:v5e-64 --workdir=DIR   # on a v5e-64
  python -m panda_jax.main --config=configs/stage1.py:v5p-64 --workdir=DIR   # on a v5p-64
  python -m panda_jax.main --config=configs/stage1.py:v6e-64 --workdir=DIR   # on a v6e-64
"""

from panda_jax.config import POD_LAYOUTS, train_config

# Pod layouts by name (panda_jax/config.py says where each came from).
LAYOUTS = POD_LAYOUTS


def get_config(arg: str = ''):
  config = train_config(1, arg, LAYOUTS)
  config.lock()
  return config
