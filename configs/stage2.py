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
    # Sweep row `s2 v5e:8x8 32x2 mb2 remat=full chunk=512` (2026-12-01, commit 9aefd58, libtpu
    # 0.0.42.1): fsdp 32 x tensor 2, micro-batch 2 (accum 32), remat 'full', query blocks of
    # 512: 14.469 GiB per chip by the TPU compiler (0.53 GiB under the 15 GiB target), MODELLED
    # MFU 75.3 % with overlap / 42.9 % without (72.5 s per step; the micro-batch-1 layout,
    # 9.512 GiB, 2026-11-30: 75.3 % / 40.1 %, 77.5 s). The overlap MFU ties with every
    # full-remat row so far (the compute term binds); the no-overlap one breaks the tie.
    'v5e-64': dict(chips=64, fsdp=32, tensor=2, micro_batch=2, remat='full',
                   attention_chunk=512),
}


def get_config(arg: str = ''):
  config = stage_config(2, arg, LAYOUTS)
  config.lock()
  return config
