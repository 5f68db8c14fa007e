"""Seconds a training step of `configs/demo.py:smollm2` (SmolLM2-135M-Instruct as the LLM),
one phase, with and without the variant's LoRA and its LM head at the answers only.

Each setting trains --steps steps of the phase (`panda_jax.demo.run.run_stage`: the real
training loop and Grain pipeline) from a fresh initialisation in a fresh process, settings
interleaved, --repeats times; the time per step is the training loop's own logged rate
between step --warmup and the last (compilation excluded). The data set (200 training clips,
the variant's settings) and the GGUF's conversion are made once under --workdir.

  variant     the config as it is (rank-32 LoRA, model.llm.loss_positions=64)
  no_lora     model.lora.rank=0 (no factors; in phases 2-3 the STAB, projector and head train)
  all_heads   model.llm.loss_positions=0 (the LM head at every position)

  python benchmarks/smollm2_step.py --phase 1                 # about 8 minutes
  python benchmarks/smollm2_step.py --phase 3 --settings variant,no_lora

Run it with nothing else on the machine. The last line is `RESULT phase=<p> s_variant=<x>
s_no_lora=<y> ratio_no_lora=<y/x> s_all_heads=<z> ratio_all_heads=<z/x>` (a setting not run:
nan).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SETTINGS = {'variant': {}, 'no_lora': {'model.lora.rank': 0},
            'all_heads': {'model.llm.loss_positions': 0}}


def _config(overrides):
  from configs import demo as demo_config
  from panda_jax import config as config_lib
  c = demo_config.get_config('smollm2')
  with c.unlocked():
    config_lib.apply_overrides(c, {'data.train_clips': 200, 'data.val_clips': 4,
                                   'data.test_clips': 4, 'data.novel_clips': 4, **overrides})
  return c


def _one(workdir: str, phase: str, steps: int, warmup: int, overrides: dict) -> float:
  """Runs in a child process: the phase for `steps` steps; -> seconds a step after `warmup`."""
  from panda_jax.demo import run as demo_run
  c = _config({f'stages.{"focus" if phase == "3a" else "stage" + phase}.steps': steps,
               'train.log_every': 1, 'train.save_every': 10 ** 6, **overrides})
  data = demo_run.make_data(c, os.path.join(workdir, 'data'), progress=False,
                            llm_converted=demo_run.pretrained_llm(c, workdir))
  stage_dir = os.path.join(workdir, 'stage')
  shutil.rmtree(stage_dir, ignore_errors=True)
  demo_run.run_stage(c, phase, stage_dir, data, progress=False)
  rows = [json.loads(l) for l in open(os.path.join(stage_dir, 'metrics.jsonl'))]
  # steps_per_s is logged as the rate since the previous log (every step here).
  times = [1.0 / r['steps_per_s'] for r in rows if r['step'] > warmup and r.get('steps_per_s')]
  return sum(times) / len(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--phase', default='1', choices=('1', '2', '3a', '3'))
  ap.add_argument('--steps', type=int, default=12)
  ap.add_argument('--warmup', type=int, default=4)
  ap.add_argument('--repeats', type=int, default=1)
  ap.add_argument('--settings', default='variant,no_lora,all_heads')
  ap.add_argument('--workdir', default='/tmp/smollm2_step')
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    print('SECONDS', _one(a.workdir, a.phase, a.steps, a.warmup, SETTINGS[a.child]))
    return
  names = a.settings.split(',')
  bad = [n for n in names if n not in SETTINGS]
  if bad:
    ap.error(f'--settings: {bad} not in {sorted(SETTINGS)}')
  if a.steps <= a.warmup:
    ap.error(f'--steps={a.steps} must be above --warmup={a.warmup}')
  seconds = {n: [] for n in names}
  for r in range(a.repeats):
    for n in names:
      out = subprocess.run([sys.executable, __file__, f'--child={n}', f'--phase={a.phase}',
                            f'--steps={a.steps}', f'--warmup={a.warmup}',
                            f'--workdir={a.workdir}'], cwd=ROOT, capture_output=True, text=True)
      if out.returncode:
        sys.exit(f'{n} failed:\n{out.stderr[-3000:]}')
      s = float([l for l in out.stdout.splitlines() if l.startswith('SECONDS')][0].split()[1])
      seconds[n].append(s)
      print(f'repeat {r} {n:<10} phase {a.phase}: {s:.2f} s a step', flush=True)
  mean = {n: sum(v) / len(v) for n, v in seconds.items()}
  base = mean.get('variant', math.nan)
  print(f'phase {a.phase}, steps {a.warmup + 1}-{a.steps}, {os.cpu_count()} cores:')
  for n in names:
    print(f'  {n:<10} {mean[n]:6.2f} s a step   {mean[n] / base:5.2f}x the variant')
  get = lambda n: mean.get(n, math.nan)
  print(f'RESULT phase={a.phase} s_variant={get("variant"):.3f} s_no_lora={get("no_lora"):.3f} '
        f'ratio_no_lora={get("no_lora") / base:.3f} s_all_heads={get("all_heads"):.3f} '
        f'ratio_all_heads={get("all_heads") / base:.3f}')


if __name__ == '__main__':
  main()
