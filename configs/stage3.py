"""Stage 3 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run; `:v5e-64` laid
out for a v5e-64 slice (LAYOUTS).

  python -m panda_jax.main --config=configs/stage3.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage3.py:tiny --workdir=DIR
  python -m panda_jax.main --config=configs/stage3.py:v5e-64 --workdir=DIR   # on a v5e-64
"""

from panda_jax.config import train_config

# Pod layouts by name (`panda_jax.config.pod_layout`'s arguments), each the best row that fits
# (<= 15 GiB per chip by the TPU compiler) with the best MODELLED MFU among the rows of
# benchmarks/sweep_tpu.py measured when it was written (README, "Layout sweep"); the global batch
# stays the paper's 1024 = micro_batch x (data x fsdp) x accum_steps.
LAYOUTS = {
    # Sweep row `s3 v5e:8x8 32x2 mb2 remat=full chunk=512` (2026-12-01, commit 9aefd58, libtpu
    # 0.0.42.1), the only stage-3 row measured when this was written: fsdp 32 x tensor 2,
    # micro-batch 2 (accum 16), remat 'full', query blocks of 512: 14.001 GiB per chip by the
    # TPU compiler, MODELLED MFU 75.3 % with overlap / 42.9 % without. Stage 2's better
    # 'dots_no_batch' layout was not compiled for stage 3 (its step is stage 2's on half the
    # batch, so it is expected to fit as well; not measured). Update from
    # `python benchmarks/sweep_tpu.py --print`.
    'v5e-64': dict(chips=64, fsdp=32, tensor=2, micro_batch=2, remat='full',
                   attention_chunk=512),
}


def get_config(arg: str = ''):
  config = train_config(3, arg, LAYOUTS)
  config.lock()
  return config
