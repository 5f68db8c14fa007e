"""The launch scripts' commands, as the README gives them (--dry-run / DRY_RUN=1)."""

import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block(heading, lang):
  """The first ```lang block after `heading` in the README, as lines."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  section = text[text.index(heading):]
  return re.search(rf'```{lang}\n(.*?)```', section, re.S).group(1).strip().splitlines()


def _run(argv, **env):
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, TMPDIR='/tmp', **env))


def test_tpu_vm_dry_run_prints_the_readme_commands_for_a_v5e_64_run():
  commands = _readme_block('### TPU pods', 'bash')
  assert any('create v5litepod-64' in c for c in commands)
  printed = []
  for line in commands:
    argv = shlex.split(line)
    assert argv[0] == 'launch/tpu_vm.sh', line
    r = _run(['bash', argv[0], '--dry-run', *argv[1:]])
    assert r.returncode == 0, (line, r.stderr)
    printed += r.stdout.strip().splitlines()
  assert printed == _readme_block('With `--dry-run` after `tpu_vm.sh`', 'text')
  # Each stage's run starts the same program with --multihost on every worker.
  runs = [p for p in printed if 'panda_jax.main' in p]
  assert len(runs) == 3 and all('--worker=all' in p and '--multihost --config=configs/stage'
                                in p for p in runs)


@pytest.mark.parametrize('args, message', [
    (['n', 'z', 'create'], 'create needs the accelerator type'),
    (['n', 'z', 'create', 'v9-8'], "accelerator type 'v9-8' not known"),
    (['n', 'z', 'run'], 'run needs panda_jax.main arguments'),
    (['n', 'z', 'logs', 'x'], "logs takes a worker number, got 'x'"),
    (['n', 'z', 'stop', 'now'], 'stop takes no arguments, got: now'),
    (['n', 'z', 'launch'], "unknown action 'launch'"),
])
def test_tpu_vm_rejects_bad_actions(args, message):
  r = _run(['bash', 'launch/tpu_vm.sh', '--dry-run', *args])
  assert r.returncode == 2 and message in r.stderr, r.stderr


def test_slurm_dry_run_installs_our_jax_for_cuda_and_runs_each_readme_stage():
  jax_version = re.search(r'^jax==(\S+)$', open(os.path.join(ROOT, 'requirements.txt')).read(),
                          re.M).group(1)
  commands = _readme_block('### SLURM GPU clusters', 'bash')
  assert [re.search(r'configs/stage\d\.py', c).group(0) for c in commands] == [
      f'configs/stage{i}.py' for i in (1, 2, 3)]
  for line in commands:
    argv = shlex.split(line)
    assert argv[0] == 'sbatch' and argv[2] == 'launch/slurm_gpu.sbatch', line
    r = _run(['bash', argv[2], *argv[3:]], DRY_RUN='1', SLURM_SUBMIT_DIR=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [
        'python3 -m venv .venv-cuda',
        f'.venv-cuda/bin/pip install -q -r requirements.txt jax[cuda12]=={jax_version}',
        'srun --ntasks-per-node=1 --kill-on-bad-exit=1 .venv-cuda/bin/python -m panda_jax.main '
        '--multihost ' + ' '.join(argv[3:])]
  r = _run(['bash', 'launch/slurm_gpu.sbatch'], DRY_RUN='1')
  assert r.returncode == 2 and 'needs panda_jax.main arguments' in r.stderr
