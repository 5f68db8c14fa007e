"""Stage 2 of Video-Panda training (paper Table 6); `:tiny` for a CPU-sized run; `:v5e-64` laid
out for a v5e-64 slice (LAYOUTS).

  python -m panda_jax.main --config=configs/stage2.py --workdir=DIR
  python -m panda_jax.main --config=configs/stage2.py:tiny --workdir=DIR
  python -m panda_jax.main --config=configs/stage2.py:v5e-64 --workdir=DIR   # on a v5e-64
  python -m panda_jax.main --config=configs/stage2.py:v5p-64 --workdir=DIR   # on a v5p-64
  python -m panda_jax.main --config=configs/stage2.py:v6e-64 --workdir=DIR   # on a v6e-64
"""

from panda_jax.config import train_config

# Pod layouts by name (`panda_jax.config.pod_layout`'s arguments), each the best row that fits
# (<= 15 GiB per chip by the TPU compiler) with the best MODELLED MFU among the rows of
# benchmarks/sweep_tpu.py measured when it was written (README, "Layout sweep"); the global batch
# stays the paper's 2048 = micro_batch x (data x fsdp) x accum_steps.
LAYOUTS = {
    # Sweep row `s2 v5e:8x8 32x2 mb1 remat=dots_no_batch chunk=512` (2026-12-01, commit
    # 9aefd58, libtpu 0.0.42.1): fsdp 32 x tensor 2, micro-batch 1 (accum 64), remat
    # 'dots_no_batch' (the weight matmuls' outputs saved, no recomputed forward), query blocks
    # of 512: 14.591 GiB per chip by the TPU compiler (0.41 GiB under the 15 GiB target),
    # MODELLED MFU 95.6 % with overlap / 52.3 % without (32.5 / 59.5 s per step), against
    # 75.3 % / 42.9 % for the best full-remat row (32 x 2, micro-batch 2, 14.469 GiB). MODELLED
    # by the roofline of benchmarks/aot_7b.py, not measured on a TPU.
    'v5e-64': dict(chips=64, fsdp=32, tensor=2, micro_batch=1, remat='dots_no_batch',
                   attention_chunk=512),
    # Sweep row `s2 v5p:4x4x4 32x2 mb8 remat=dots_no_batch chunk=512` (2026-12-01, commit 0316b05,
    # libtpu 0.0.42.1), the only v5p-64 row of this stage: v5e-64's layout with the micro-batch a
    # v5p chip's 95 GiB allow (accum 8): 78.374 GiB per chip by the TPU compiler, MODELLED MFU 95.6
    # % with overlap / 68.2 % without (14.0 / 19.6 s per step). Not compared with other v5p-64
    # layouts; MODELLED, not measured on a TPU.
    'v5p-64': dict(chips=64, fsdp=32, tensor=2, micro_batch=8, remat='dots_no_batch',
                   attention_chunk=512),
    # Sweep row `s2 v6e:8x8 32x2 mb2 remat=dots_no_batch chunk=512` (2026-12-01, commit 0316b05,
    # libtpu 0.0.42.1), the only v6e-64 row of this stage: v5e-64's layout with the micro-batch a
    # v6e chip's 32 GiB allow (accum 32): 24.445 GiB per chip by the TPU compiler, MODELLED MFU 80.2
    # % with overlap / 37.5 % without (8.3 / 17.8 s per step). Not compared with other v6e-64
    # layouts; MODELLED, not measured on a TPU.
    'v6e-64': dict(chips=64, fsdp=32, tensor=2, micro_batch=2, remat='dots_no_batch',
                   attention_chunk=512),
}


def get_config(arg: str = ''):
  config = train_config(2, arg, LAYOUTS)
  config.lock()
  return config
