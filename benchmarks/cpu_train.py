"""Training steps per second on a CPU host: Grain's reader threads, glibc's malloc, and the
clip cache.

The demo's stage 3 (`configs/demo.py`: the tiny model, batch 8, 4 frames of 112 x 84 clips,
three-question conversations, the online teacher) trained by `panda_jax.demo.run.run_stage`
(the real training loop and Grain pipeline) for --steps steps from a fresh initialisation, in a
fresh process per setting (malloc settings are per process), settings interleaved, --repeats
times:

  before   data.read_threads=16 (Grain's default), glibc malloc as it comes
  threads  data.read_threads=-1 (one per core, at most 16), malloc as it comes
  malloc   16 reader threads, glibc asked (mallopt) to serve requests up to 32 MiB from its
           heap and not to give freed memory back to the kernel
  both     2 reader threads and that malloc setting
  cache    as before, with data.video_cache_mb=1024 (`pipeline.VideoCache`: a clip decoded and
           padded once; here every clip comes back about every 50 steps, as in the demo's
           stage 3a)

Neither threads nor malloc is the default: in steady training neither changed the steps per
second (docs/benchmarks.md). The cache is the demo's (configs/demo.py).

The rate is taken from the training loop's own logged `steps_per_s` (counted from the end of
the first, compiling, step) between step --warmup and the last step: Grain's readers fill their
buffer (up to 500 samples, 62 batches) while the first step compiles, so the first steps after
it run on data read during compilation and would flatter every setting. Each run also reports
its minor page faults per second and the share of its CPU time spent in the kernel, both over
the whole run (compilation included, which faults most: in steady training
that malloc setting took a demo run from ~100,000 faults a second to ~170, read from /proc).
The data set (--clips clips, made once under --workdir) is the demo generator's with the demo's
settings.

  python benchmarks/cpu_train.py                    # steps 80 -> 240, 1 repeat: ~14 minutes
  python benchmarks/cpu_train.py --warmup 100 --steps 400 --repeats 2
  python benchmarks/cpu_train.py --settings before,cache

Run it with nothing else on the machine. The last line is `RESULT host_cores=<n>
steps_per_s_before=<x> steps_per_s_both=<y> ratio=<y/x> steps_per_s_cache=<z>
ratio_cache=<z/x>` (a setting not run: nan).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (reader threads, malloc keeps freed memory, data.video_cache_mb)
SETTINGS = {'before': (16, False, 0), 'threads': (-1, False, 0), 'malloc': (16, True, 0),
            'both': (-1, True, 0), 'cache': (16, False, 1024)}


def _keep_freed_memory() -> None:
  """mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 1 GiB) (glibc)."""
  import ctypes
  import ctypes.util
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  if not (libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1):
    raise RuntimeError('mallopt refused the settings (not glibc?)')


def _config(clips: int, **overrides):
  from configs import demo as demo_config
  c = demo_config.get_config()
  c.unlock()
  c.data.train_clips = clips
  c.data.val_clips = c.data.test_clips = c.data.novel_clips = 4
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  c.lock()
  return c


def one(args) -> None:
  """One setting in this process: prints a JSON line with its rate, faults and kernel share."""
  threads, keep, cache_mb = SETTINGS[args.one]
  if keep:
    _keep_freed_memory()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from panda_jax.demo import run as demo_run
  data = demo_run.make_data(_config(args.clips), os.path.join(args.workdir, 'data'),
                            progress=False)
  if args.steps % 20 or args.warmup % 20 or not 0 < args.warmup < args.steps:
    raise ValueError(f'--warmup={args.warmup} and --steps={args.steps} must be multiples of 20 '
                     'with 0 < warmup < steps')
  c = _config(args.clips, **{'data.read_threads': threads, 'data.video_cache_mb': cache_mb,
                             'stages.stage3.steps': args.steps,
                             'train.save_every': 10 ** 6, 'train.log_every': 20})
  wd = os.path.join(args.workdir, f'run_{args.one}')
  shutil.rmtree(wd, ignore_errors=True)
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  demo_run.run_stage(c, 3, wd, data, progress=False)
  wall = time.perf_counter() - t0
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    logged = {r['step']: r['steps_per_s'] for r in map(json.loads, f)}
  shutil.rmtree(wd, ignore_errors=True)
  # The loop's rate at step k is (k - 1) / (seconds since the end of step 1).
  elapsed = lambda k: (k - 1) / logged[k]  # noqa: E731
  rate = (args.steps - args.warmup) / (elapsed(args.steps) - elapsed(args.warmup))
  cpu_sys, cpu_user = r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime
  print(json.dumps({'steps_per_s': rate,
                    'faults_per_s': (r1.ru_minflt - r0.ru_minflt) / wall,
                    'kernel_share': cpu_sys / max(cpu_sys + cpu_user, 1e-9)}))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/panda_cpu_train')
  p.add_argument('--clips', type=int, default=400)
  p.add_argument('--steps', type=int, default=240)
  p.add_argument('--warmup', type=int, default=80)
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--settings', default=','.join(SETTINGS),
                 help=f'comma-separated, of {", ".join(SETTINGS)} (before always runs)')
  p.add_argument('--one', choices=sorted(SETTINGS), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    return one(args)
  chosen = ['before'] + [n for n in args.settings.split(',') if n and n != 'before']
  unknown = sorted(set(chosen) - set(SETTINGS))
  if unknown:
    raise SystemExit(f'--settings: unknown {unknown}; expected some of {list(SETTINGS)}')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  runs = {name: [] for name in chosen}
  for rep in range(args.repeats):
    for name in chosen:
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__), '--one', name, '--workdir', args.workdir,
           '--clips', str(args.clips), '--steps', str(args.steps),
           '--warmup', str(args.warmup)],
          check=True, capture_output=True, text=True, env=env, cwd=ROOT)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      runs[name].append(r)
      print(f'repeat {rep}: {name}: {r["steps_per_s"]:.3f} steps/s, '
            f'{r["faults_per_s"]:.0f} page faults/s, kernel {100 * r["kernel_share"]:.0f} %',
            flush=True)
  med = lambda name, k: statistics.median(r[k] for r in runs[name])  # noqa: E731
  cores = os.cpu_count()
  print(f'\nthe demo\'s stage 3, steps {args.warmup} -> {args.steps} of each run, median of '
        f'{args.repeats}, {cores} CPU cores\n')
  print('| setting | reader threads | malloc keeps freed memory | clip cache MiB | steps/s | '
        'page faults/s (whole run) | kernel share of CPU (whole run) | vs before |')
  print('|---|---:|---|---:|---:|---:|---:|---:|')
  from panda_jax.data import pipeline
  ref = med('before', 'steps_per_s')
  for name in chosen:
    threads, keep, cache_mb = SETTINGS[name]
    s = med(name, 'steps_per_s')
    print(f'| {name} | {pipeline.read_options(threads).num_threads} | {"yes" if keep else "no"} '
          f'| {cache_mb} | {s:.3f} | {med(name, "faults_per_s"):,.0f} | '
          f'{100 * med(name, "kernel_share"):.0f} % | {s / ref:.2f}x |')
  rate = lambda name: med(name, 'steps_per_s') if name in runs else float('nan')  # noqa: E731
  both, cache = rate('both'), rate('cache')
  print(f'\nRESULT host_cores={cores} steps_per_s_before={ref:.3f} steps_per_s_both={both:.3f} '
        f'ratio={both / ref:.3f} steps_per_s_cache={cache:.3f} ratio_cache={cache / ref:.3f}')


if __name__ == '__main__':
  main()
