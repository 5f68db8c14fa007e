"""Stage 3 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run;
`:v5e-64`, `:v5p-64`, `:v6e-64` laid out for those slices (LAYOUTS); `:lora` fine-tunes the
decoder through LoRA factors (docs/training.md, "LoRA fine-tuning"), also `:tiny,lora`.

  python -m panda_jax.main --config=configs/stage3.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage3.py:tiny --workdir=DIR
  python -m panda_jax.main --config=configs/stage3.py:lora --workdir=DIR
  python -m panda_jax.main --config=configs/stage3.py:v5e-64 --workdir=DIR   # on a v5e-64
  python -m panda_jax.main --config=configs/stage3.py:v5p-64 --workdir=DIR   # on a v5p-64
  python -m panda_jax.main --config=configs/stage3.py:v6e-64 --workdir=DIR   # on a v6e-64
"""

from panda_jax.config import POD_LAYOUTS, train_config

# Pod layouts by name (panda_jax/config.py says where each came from).
LAYOUTS = POD_LAYOUTS


def get_config(arg: str = ''):
  config = train_config(3, arg, LAYOUTS)
  config.lock()
  return config
