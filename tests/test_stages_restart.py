"""End to end: a stage-2 run killed with SIGKILL, restarted, ends exactly where the same run
uninterrupted does (in its own file, so the two workers of `pytest -n 2 --dist loadfile` can
run it beside the three-stage chain of test_stages.py)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import subprocess_env
from test_stages import _params, data  # noqa: F401  (the module fixture, made again here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, data, steps, *extra):
  c = ['--config=configs/stage2.py:tiny', f'--workdir={workdir}',
       f'--config.data.annotations={data["root"] / "train_captions.json"}',
       f'--config.data.video_root={data["root"]}', f'--config.data.tokenizer={data["tokenizer"]}',
       f'--config.train.steps={steps}', '--config.train.save_every=2',
       '--config.model.stab.dropout=0.0', *extra]
  return [sys.executable, '-m', 'panda_jax.main', *c]


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted(tmp_path, data):
  # Killed once checkpoint 2 of 6 exists: four steps (and two saves) of margin, as many as the
  # kill at 4 of 8 had. The reference runs first and compiles; the victim and its restart read
  # the compiled programs from the session's compilation cache (started side by side, the
  # reference and the victim compiled the same programs twice, at once, on the same cores).
  steps = 6
  env = subprocess_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  ref = subprocess.run(_main(tmp_path / 'ref', data, steps), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  victim = tmp_path / 'victim'
  proc = subprocess.Popen(_main(victim, data, steps), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 900
    while not (victim / 'checkpoints' / '2').exists():
      assert proc.poll() is None, 'the run ended before it could be killed'
      assert time.time() < deadline
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  done = sorted(int(p.name) for p in (victim / 'checkpoints').iterdir() if p.name.isdigit())
  assert done and done[-1] < steps, done
  again = subprocess.run(_main(victim, data, steps), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step' in again.stderr
  a, b = _params(tmp_path / 'ref', steps), _params(victim, steps)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
