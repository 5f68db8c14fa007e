"""Stage 1 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run; `:v5e-64` laid
out for a v5e-64 slice (LAYOUTS).

  python -m panda_jax.main --config=configs/stage1.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage1.py:tiny --workdir=DIR
  python -m panda_jax.main --config=configs/stage1.py:v5e-64 --workdir=DIR   # on a v5e-64
"""

from panda_jax.config import train_config

# Pod layouts by name (`panda_jax.config.pod_layout`'s arguments), each the best row that fits
# (<= 15 GiB per chip by the TPU compiler) with the best MODELLED MFU among the rows of
# benchmarks/sweep_tpu.py measured when it was written (README, "Layout sweep"); the global batch
# stays the paper's 2048 = micro_batch x (data x fsdp) x accum_steps.
LAYOUTS = {
    # Sweep row `s1 v5e:8x8 32x2 mb2 remat=full chunk=512` (2026-12-01, commit 9aefd58, libtpu
    # 0.0.42.1), the only stage-1 row measured when this was written: fsdp 32 x tensor 2,
    # micro-batch 2 (accum 32), remat 'full', query blocks of 512: 11.620 GiB per chip by the
    # TPU compiler, MODELLED MFU 68.6 % with overlap / 36.2 % without (the frozen LLM's model
    # FLOPs are 4 N per token, the recomputed forward still 2 N). Other stage-1 rows (micro-batch
    # 4, 64 x 1) were pending; update from `python benchmarks/sweep_tpu.py --print`.
    'v5e-64': dict(chips=64, fsdp=32, tensor=2, micro_batch=2, remat='full',
                   attention_chunk=512),
}


def get_config(arg: str = ''):
  config = train_config(1, arg, LAYOUTS)
  config.lock()
  return config
