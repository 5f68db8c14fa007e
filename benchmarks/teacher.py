"""Forward-pass benchmark of the distillation teacher (LanguageBind video encoder).

Measures `panda_jax.models.teacher.VideoTeacher` on ONE video (default: 8 frames at 224 px,
`TeacherConfig()`: ViT-L/14 with a temporal step in every layer, features from
hidden_states[-2], so 23 of the 24 layers run), float32, jitted, on the default JAX device,
with random parameters (values do not change the work).

Prints GFLOP/video from XLA's cost analysis of the compiled function next to a count by hand
(matmuls only: projections, MLP, patch embedding and both attentions' score and context
products), the median ms/video over --runs timed calls after a warm-up, the achieved GFLOP/s
and the fraction of a float32 matmul peak measured in the same run (median of 5 n x n
matmuls, measured before and after the model, the better of the two).

Run from the repo root:
  python benchmarks/teacher.py                    # full size (a few minutes on 2 CPU cores)
  python benchmarks/teacher.py --image_size 56 --hidden 64 --layers 3 --heads 4 --mlp 128 \
      --runs 2 --matmul_n 256                     # tiny smoke run
The last line is `RESULT ms_per_video=<x> peak_fraction=<y>`.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from panda_jax.models.teacher import TeacherConfig, VideoTeacher  # noqa: E402
from common import compiled_gflop, matmul_peak, time_ms, timed  # noqa: E402


def hand_gflop(cfg: TeacherConfig, frames: int) -> float:
  """Matmul FLOPs of one video: 2 * multiply-adds, per layer run."""
  c, m, n, t = cfg.hidden, cfg.mlp, 1 + cfg.num_patches, cfg.num_frames
  tokens = frames * n
  patch = 2 * frames * cfg.num_patches * 3 * cfg.patch_size ** 2 * c
  spatial = 2 * tokens * (4 * c * c + 2 * c * m) + 2 * 2 * frames * n * n * c
  temporal = (2 * tokens * 4 * c * c + 2 * 2 * tokens * t * c) if cfg.temporal else 0
  return (patch + cfg.run_layers * (spatial + temporal)) / 1e9


def random_params(cfg: TeacherConfig, frames, seed: int = 0):
  """Random variables {'params': ...} from the abstract shapes (no compiled init)."""
  shapes = nn.unbox(jax.eval_shape(VideoTeacher(cfg).init, jax.random.PRNGKey(0), frames))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, dtype=np.float32)), shapes)


def main():
  d = TeacherConfig()
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--runs', type=int, default=3, help='timed calls (median)')
  ap.add_argument('--frames', type=int, default=8, help='frames per video')
  ap.add_argument('--image_size', type=int, default=d.image_size)
  ap.add_argument('--patch_size', type=int, default=d.patch_size)
  ap.add_argument('--hidden', type=int, default=d.hidden)
  ap.add_argument('--layers', type=int, default=d.layers)
  ap.add_argument('--heads', type=int, default=d.heads)
  ap.add_argument('--mlp', type=int, default=d.mlp)
  ap.add_argument('--num_frames', type=int, default=d.num_frames, help='teacher clip length')
  ap.add_argument('--plain', action='store_true', help='no temporal step (CLIP teacher)')
  ap.add_argument('--matmul_n', type=int, default=4096, help='side of the peak matmul')
  args = ap.parse_args()

  cfg = TeacherConfig(hidden=args.hidden, layers=args.layers, heads=args.heads, mlp=args.mlp,
                      patch_size=args.patch_size, image_size=args.image_size,
                      num_frames=args.num_frames, temporal=not args.plain)
  cfg.validate()
  shape = (1, args.frames, cfg.image_size, cfg.image_size, 3)
  frames = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)

  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'{os.cpu_count()} CPU cores')
  print(f'video: 1 x {args.frames} frames x {cfg.image_size}px, hidden={cfg.hidden}, '
        f'layers run={cfg.run_layers}/{cfg.layers}, heads={cfg.heads}, mlp={cfg.mlp}, '
        f'temporal={cfg.temporal} (clip {cfg.num_frames}), float32, runs={args.runs}')
  peak = matmul_peak(args.matmul_n)

  model = VideoTeacher(cfg)
  params = random_params(cfg, frames)
  compile_s, compiled = timed(lambda: jax.jit(model.apply).lower(params, frames).compile())
  gflop = compiled_gflop(compiled)
  times = time_ms(compiled, params, frames, runs=args.runs)
  ms = statistics.median(times)
  peak = max(peak, matmul_peak(args.matmul_n))
  gflops = gflop / (ms / 1e3)
  frac = gflops / peak

  print()
  print(f'compile: {compile_s:.1f} s')
  print(f'GFLOP/video: {gflop:.4g} (XLA cost analysis), {hand_gflop(cfg, args.frames):.4g} '
        '(matmuls by hand)')
  print(f'ms/video: {ms:.1f} (median of {args.runs}: ' +
        ', '.join(f'{t:.0f}' for t in times) + ')')
  print(f'achieved: {gflops:.1f} GFLOP/s')
  print(f'matmul peak: {peak:.1f} GFLOP/s (float32 {args.matmul_n}x{args.matmul_n}, '
        f'median of 5, the better of before and after)')
  print(f'RESULT ms_per_video={ms:.1f} peak_fraction={frac:.3f}')


if __name__ == '__main__':
  main()
