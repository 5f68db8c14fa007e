"""Stage 2 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run; `:v5e-64` laid
out for a v5e-64 slice (LAYOUTS).

  python -m panda_jax.main --config=configs/stage2.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage2.py:tiny --workdir=DIR
  python -m panda_jax.main --config=configs/stage2.py:v5e-64 --workdir=DIR   # on a v5e-64
"""

from panda_jax.config import stage_config

# Pod layouts by name (`panda_jax.config.pod_layout`'s arguments), each the best row that fits
# (<= 15 GiB per chip by the TPU compiler) with the best MODELLED MFU among the rows of
# benchmarks/sweep_tpu.py measured when it was written (README, "Layout sweep"); the global batch
# stays the paper's 2048 = micro_batch x (data x fsdp) x accum_steps.
LAYOUTS = {
    # fsdp 32 x tensor 2, micro-batch 1 (accum 64), remat 'full', query blocks of 512: 9.512 GiB
    # per chip by the TPU compiler (libtpu 0.0.42.1), MODELLED MFU 75.3 % (roofline of
    # benchmarks/aot_7b.py), measured 2026-11-30 (README, benchmarks/aot_7b.py). No sweep row had
    # finished when this variant was written (2026-12-01); update it from
    # `python benchmarks/sweep_tpu.py --print`.
    'v5e-64': dict(chips=64, fsdp=32, tensor=2, micro_batch=1, remat='full',
                   attention_chunk=512),
}


def get_config(arg: str = ''):
  config = stage_config(2, arg, LAYOUTS)
  config.lock()
  return config
