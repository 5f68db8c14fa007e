"""The launch scripts' commands, as docs/launch.md gives them (--dry-run / DRY_RUN=1): printed as
the page shows them, and every `python -m panda_jax...` in them parsed (config file, variant,
overrides and flags exist); `tpu_vm.sh wait` run against fake workers."""

import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_OPERATORS = {';', '&', '&&', '||', '|', '>', '<', '>>', '>&', '2>&1', '(', ')'}


def _doc_block(heading, lang, doc='docs/launch.md'):
  """The first ```lang block after `heading` in `doc`, as lines."""
  text = open(os.path.join(ROOT, doc)).read()
  section = text[text.index(heading):]
  return re.search(rf'```{lang}\n(.*?)```', section, re.S).group(1).strip().splitlines()


def _run(argv, **env):
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, TMPDIR='/tmp', **env))


def python_commands(command: str) -> list[tuple[str, list[str]]]:
  """Every `python -m MODULE ARGS` in a shell command line, as (MODULE, ARGS), also inside
  quoted strings (`--command '...'`, `bash -c "..."`), which are searched again."""
  lex = shlex.shlex(command, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  words = list(lex)
  found = []
  for i, w in enumerate(words):
    if re.search(r'\s', w):
      found += python_commands(w)
    elif (w == 'python' or w.endswith('/python')) and words[i + 1:i + 2] == ['-m']:
      args = []
      for a in words[i + 3:]:
        if a in SHELL_OPERATORS or set(a) <= set(';&|<>()'):
          break
        args.append(a)
      found.append((words[i + 2], args))
  return found


def test_python_commands_are_found_inside_quoted_commands():
  line = ('gcloud ssh x --command \'cd d; setsid nohup bash -c "python -m panda_jax.main --a=1 '
          '\'\\\'\'--b=x y\'\\\'\' & echo \\$! > run.pid" > log 2>&1 &\'; '
          'srun .venv/bin/python -m m2 --c')
  assert python_commands(line) == [('panda_jax.main', ['--a=1', '--b=x y']), ('m2', ['--c'])]


@functools.cache
def module_flags(module: str) -> frozenset:
  """The absl flags `python -m MODULE` defines, read from its --helpfull (one subprocess)."""
  r = subprocess.run([sys.executable, '-m', module, '--helpfull'], cwd=ROOT, capture_output=True,
                     text=True, timeout=120, env=subprocess_env())
  names = frozenset(re.findall(r'^\s+--(?:\[no\])?([\w.-]+):', r.stdout, re.M))
  assert names, (module, r.stdout[-2000:], r.stderr[-2000:])
  return names


def check_command(module: str, args: list[str]):
  """Fails unless `python -m module args` names an existing config file and variant, existing
  config fields in its overrides, and flags the module defines."""
  assert module.startswith('panda_jax.'), module
  defined = module_flags(module)
  config_args = []
  for a in args:
    assert a.startswith('--'), (module, a)
    name = a[2:].partition('=')[0]
    if name == 'config' or name.startswith('config.'):
      config_args.append(a)
    else:
      assert name in defined or (name.startswith('no') and name[2:] in defined), (
          f'{module} has no flag --{name}')
  assert config_args and config_args[0].startswith('--config='), (module, args)
  path = config_args[0].partition('=')[2].partition(':')[0]
  assert os.path.isfile(os.path.join(ROOT, path)), path
  # The config as main would parse it: the file, its variant, and each override (an unknown
  # field is an unknown flag).
  fv = flags.FlagValues()
  argv = ['main', *config_args]
  config_flags.DEFINE_config_file('config', flag_values=fv, lock_config=True, sys_argv=argv)
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    fv(argv)
    assert fv.config is not None
  finally:
    os.chdir(cwd)


def test_check_command_refuses_unknown_configs_fields_and_flags():
  check_command('panda_jax.main', ['--config=configs/stage2.py:tiny', '--config.train.steps=3',
                                   '--multihost', '--workdir=/w'])
  for bad in (['--config=configs/stage9.py'], ['--config=configs/stage2.py:tiny',
                                               '--config.train.stepz=3'],
              ['--config=configs/stage2.py:tiny', '--workdirr=/w']):
    with pytest.raises(Exception):
      check_command('panda_jax.main', bad)


def test_tpu_vm_dry_run_prints_the_documented_commands_for_a_v5e_64_run():
  commands = _doc_block('## TPU pods', 'bash')
  assert any('create v5litepod-64' in c for c in commands)
  printed = []
  for line in commands:
    argv = shlex.split(line)
    assert argv[0] == 'launch/tpu_vm.sh', line
    r = _run(['bash', argv[0], '--dry-run', *argv[1:]])
    assert r.returncode == 0, (line, r.stderr)
    printed += r.stdout.strip().splitlines()
  assert printed == _doc_block('With `--dry-run` after `tpu_vm.sh`', 'text')
  # Each stage's run starts the same program with --multihost on every worker, with a config,
  # overrides and flags that exist; stage 2 trains on all of Valley.
  runs = [(p, python_commands(p)) for p in printed if 'panda_jax.main' in p]
  assert len(runs) == 3 and all('--worker=all' in p and len(c) == 1 for p, c in runs)
  for i, (_, [(module, args)]) in enumerate(runs):
    assert module == 'panda_jax.main' and args[0] == '--multihost'
    assert args[1].startswith(f'--config=configs/stage{i + 1}.py:v5e-64'), args
    check_command(module, args)
  assert '--config.data.packed=gs://bucket/packed_702k' in runs[1][1][0][1]
  # setup installs the default and the TPU sets, nothing else.
  assert any(p.endswith("pip install -q -r requirements.txt -r requirements-tpu.txt'")
             for p in printed)


@pytest.mark.parametrize('args, message', [
    (['n', 'z', 'create'], 'create needs the accelerator type'),
    (['n', 'z', 'create', 'v9-8'], "accelerator type 'v9-8' not known"),
    (['n', 'z', 'run'], 'run needs panda_jax.main arguments'),
    (['n', 'z', 'logs', 'x'], "logs takes a worker number, got 'x'"),
    (['n', 'z', 'stop', 'now'], 'stop takes no arguments, got: now'),
    (['n', 'z', 'wait', '5'], 'wait takes no arguments, got: 5'),
    (['n', 'z', 'launch'], "unknown action 'launch'"),
])
def test_tpu_vm_rejects_bad_actions(args, message):
  r = _run(['bash', 'launch/tpu_vm.sh', '--dry-run', *args])
  assert r.returncode == 2 and message in r.stderr, r.stderr


FAKE_GCLOUD = r'''#!/usr/bin/env bash
# `gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all --command CMD`: CMD on each fake
# worker, one after the other, with its own HOME and hostname.
cmd=${@: -1}
for w in w0 w1; do HOME=$FAKE_ROOT/$w FAKE_HOST=$w bash -c "$cmd" || exit $?; done
'''
FAKE_PYTHON = r'''#!/usr/bin/env bash
# `python -m panda_jax.main ARGS` on a fake worker: records its arguments; FAIL_ON=HOST exits 1
# with a traceback there; PEER_ON=HOST exits 3 a moment later (panda_jax's "another process
# failed"); elsewhere it trains until SIGTERM (STUCK_ON=HOST: ignores SIGTERM, like a process
# blocked in a collective).
printf '%s\n' "$@" > args
if [ "$FAKE_HOST" = "$FAIL_ON" ]; then
  sleep 0.5; echo 'Traceback (most recent call last):'; echo "ValueError: $FAKE_HOST broke" >&2
  exit 1
fi
if [ "$FAKE_HOST" = "$PEER_ON" ]; then
  sleep 0.7; echo "process 1 of 2 failed with ValueError: exiting" >&2
  exit 3
fi
trap 'if [ "$FAKE_HOST" = "$STUCK_ON" ]; then echo ignoring SIGTERM; else exit 0; fi' TERM
for i in $(seq 300); do sleep 0.1; done
'''


@pytest.mark.parametrize('fail_on, peer', [('w1', False), ('w1', True), ('', False)])
def test_tpu_vm_wait_stops_every_worker_when_one_fails(tmp_path, fail_on, peer):
  """`run` then `wait` on two fake workers: when w1 raises, `wait` names its error, stops w0 (it
  ignores SIGTERM: SIGKILL after the grace) and exits with w1's status, also when w0 has exited
  3 on hearing of it (`peer`: the status of the process that failed first is the one reported);
  when none fails (`stop` makes both exit 0) it exits 0. The arguments reach python intact."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (('gcloud', FAKE_GCLOUD), ('python', FAKE_PYTHON),
                     ('hostname', '#!/bin/sh\necho "$FAKE_HOST"\n')):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  for w in ('w0', 'w1'):
    (tmp_path / w / 'panda-jax' / '.venv' / 'bin').mkdir(parents=True)
    (tmp_path / w / 'panda-jax' / '.venv' / 'bin' / 'activate').write_text('')
  env = dict(PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_ROOT=str(tmp_path), FAIL_ON=fail_on,
             STUCK_ON='w0' if fail_on and not peer else '', PEER_ON='w0' if peer else '',
             TPU_WAIT_POLL='0.3' if not peer else '1.5', TPU_KILL_GRACE='2')
  odd = "--workdir=gs://b/it's $HOME \"x\" \\n"
  try:
    r = _run(['bash', 'launch/tpu_vm.sh', 'n', 'z', 'run', '--config=configs/stage1.py', odd],
             **env)
    assert r.returncode == 0, r.stderr
    if not fail_on:
      time.sleep(1)
      assert 'w0: running' in _run(['bash', 'launch/tpu_vm.sh', 'n', 'z', 'status'], **env).stdout
      _run(['bash', 'launch/tpu_vm.sh', 'n', 'z', 'stop'], **env)
    start = time.monotonic()
    r = _run(['bash', 'launch/tpu_vm.sh', 'n', 'z', 'wait'], **env)
    took = time.monotonic() - start
    for _ in range(50):      # each worker's wrapper writes its status as its python ends
      if all((tmp_path / w / 'panda-jax' / 'run.status').exists() for w in ('w0', 'w1')):
        break
      time.sleep(0.1)
    args = (tmp_path / 'w0' / 'panda-jax' / 'args').read_text().splitlines()
    assert args == ['-m', 'panda_jax.main', '--multihost', '--config=configs/stage1.py', odd]
    status = {w: (tmp_path / w / 'panda-jax' / 'run.status').read_text().strip()
              for w in ('w0', 'w1')}
    if peer:
      assert r.returncode == 1, (r.stdout, r.stderr)
      assert 'failed: panda-jax w0: exited 3; panda-jax w1: exited 1' in r.stderr
      assert 'ValueError: w1 broke' in r.stdout
      assert status == {'w0': '3', 'w1': '1'} and took < 15
    elif fail_on:
      assert r.returncode == 1, (r.stdout, r.stderr)
      assert 'panda-jax w1: exited 1' in r.stdout and 'ValueError: w1 broke' in r.stdout
      assert 'failed: panda-jax w1: exited 1' in r.stderr
      assert 'panda-jax w0: SIGKILL after 2 s' in r.stdout
      assert status == {'w0': '137', 'w1': '1'} and took < 15
    else:
      assert r.returncode == 0, (r.stdout, r.stderr)
      assert 'every worker exited 0' in r.stdout and status == {'w0': '0', 'w1': '0'}
  finally:
    for w in ('w0', 'w1'):
      pid = tmp_path / w / 'panda-jax' / 'run.pid'
      if pid.exists():
        try:
          os.kill(int(pid.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
          pass


def test_slurm_dry_run_installs_the_cuda_set_and_runs_each_documented_stage_chained():
  reqs = {f: open(os.path.join(ROOT, f)).read() for f in ('requirements.txt',
                                                          'requirements-cuda.txt')}
  jax_version = re.search(r'^jax==(\S+)$', reqs['requirements.txt'], re.M).group(1)
  assert re.search(rf'^jax\[cuda12\]=={re.escape(jax_version)}$', reqs['requirements-cuda.txt'],
                   re.M)
  assert not re.search(r'^[^#]*libtpu', reqs['requirements.txt'] + reqs['requirements-cuda.txt'],
                       re.M)
  lines = _doc_block('## SLURM GPU clusters', 'bash')
  assert len(lines) == 3
  previous = None
  for i, line in enumerate(lines):
    m = re.fullmatch(r'(?:(\w+)=\$\()?(sbatch .*?)\)?', line)
    argv = shlex.split(m.group(2))
    script = argv.index('launch/slurm_gpu.sbatch')
    options, args = argv[1:script], argv[script + 1:]
    # Stages 2 and 3 start only when the previous job succeeded.
    if previous:
      assert f'--dependency=afterok:${previous}' in options, line
    if i < 2:
      assert '--parsable' in options and m.group(1), line
    previous = m.group(1)
    r = _run(['bash', argv[script], *args], DRY_RUN='1', SLURM_SUBMIT_DIR=ROOT)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip().splitlines()
    assert printed[:2] == ['python3 -m venv .venv-cuda',
                           '.venv-cuda/bin/pip install -q -r requirements.txt -r '
                           'requirements-cuda.txt']
    assert printed[2].startswith('srun --ntasks-per-node=1 --kill-on-bad-exit=1 ')
    [(module, main_args)] = python_commands(printed[2])
    assert module == 'panda_jax.main' and main_args == ['--multihost', *args]
    assert args[0] == f'--config=configs/stage{i + 1}.py'
    check_command(module, main_args)
  assert '--config.data.annotations=/shared/valley_702k.json' in lines[1]
  r = _run(['bash', 'launch/slurm_gpu.sbatch'], DRY_RUN='1')
  assert r.returncode == 2 and 'needs panda_jax.main arguments' in r.stderr


def test_ci_runs_the_readme_test_set_up_and_command_and_the_default_set_is_cpu_only():
  """.ci/run installs what the README's test line installs and runs its pytest command; the
  default set holds neither libtpu nor Beam (their own sets do)."""
  [line] = [l for l in open(os.path.join(ROOT, 'README.md')).read().splitlines()
            if l.startswith('python3 -m venv') and 'pytest' in l]
  steps = [shlex.split(s) for s in line.split('&&')]
  installs = [s for s in steps if s[:2] == ['pip', 'install']]
  [pytest_cmd] = [s for s in steps if s[:3] == ['python', '-m', 'pytest']]
  ci = [shlex.split(l) for l in open(os.path.join(ROOT, '.ci', 'run')).read().splitlines()
        if l and not l.startswith('#')]
  ci_installs = [l for l in ci if l[:4] == ['python', '-m', 'pip', 'install'] and
                 l[4:] != ['-q', '--upgrade', 'pip']]
  assert ci_installs == [['python', '-m', 'pip', 'install', '-q', *i[2:]] for i in installs]
  assert pytest_cmd in ci
  assert [i[2:] for i in installs] == [
      ['-r', 'requirements.txt', '-r', 'requirements-test.txt'],
      ['--no-deps', '-r', 'requirements-test-nodeps.txt']]
  pins = {}
  for f in ('requirements.txt', 'requirements-tpu.txt', 'requirements-beam.txt'):
    pins[f] = {re.split(r'[=\[;]', l)[0].strip() for l in open(os.path.join(ROOT, f))
               if l.strip() and not l.startswith('#')}
  assert not pins['requirements.txt'] & {'libtpu', 'apache-beam'}
  assert 'libtpu' in pins['requirements-tpu.txt'] and 'apache-beam' in pins['requirements-beam.txt']
  test_set = open(os.path.join(ROOT, 'requirements-test.txt')).read().splitlines()
  assert {'-r requirements-tpu.txt', '-r requirements-beam.txt'} <= set(test_set)
