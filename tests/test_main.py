"""The entry point as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(*args):
  return subprocess.Popen([sys.executable, '-m', 'panda_jax.main', *args], cwd=ROOT,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(*args):
  return _finish(_start(*args))


@pytest.mark.slow
def test_demo_runs_and_writes_resolved_config(tmp_path):
  # The workdir holds a run of another config (seed 1) and what it wrote: refused, naming the
  # field; --overwrite deletes that run (not the user's other files) and starts over.
  args = ('--config=configs/stab.py:tiny', f'--workdir={tmp_path}', '--config.demo.width=4',
          '--config.demo.height=3')
  r = _run(*args, '--config.seed=1')
  assert r.returncode == 0, r.stderr[-3000:]
  (tmp_path / 'checkpoints' / '3').mkdir(parents=True)
  (tmp_path / 'notes.txt').write_text('mine')
  r = _run(*args)
  assert r.returncode != 0 and f'{tmp_path} holds a run started with another config' in r.stderr
  assert 'seed: 1 -> 0' in r.stderr and 'Use a fresh --workdir, or --overwrite' in r.stderr
  r = _run(*args, '--overwrite')
  assert r.returncode == 0, r.stderr[-3000:]
  assert not (tmp_path / 'checkpoints').exists() and (tmp_path / 'notes.txt').read_text() == 'mine'
  assert json.load(open(tmp_path / 'config.json'))['seed'] == 0
  # 4:3 at the tiny size (112 px, 14-px patches): 3 of 4 teacher patches, 6 x 8 student
  # patches, 3 x 4 LSD tokens per frame -> 1 + 3 * 5 = 16 tokens.
  assert 'video sequence length 128' in r.stdout, r.stdout
  assert '    0    3 x 4        16' in r.stdout
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['demo']['width'] == 4 and saved['model']['size'] == 'tiny'


def test_bad_config_fields_fail_clearly():
  # Three independent processes, started together: each spends its time importing JAX.
  procs = [_start('--config=configs/stab.py:tiny', '--config.demo.frames=6'),
           _start('--config=configs/stab.py:tiny', '--config.demo.nonexistent=1'),
           _start('--config=configs/stab.py:huge'),
           _start('--config=configs/demo.py:smoke', '--workdir=gs://bucket/demo')]
  frames, unknown, size, remote = [_finish(p) for p in procs]
  assert remote.returncode != 0 and '--workdir=gs://bucket/demo: the demo writes' in remote.stderr
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
  assert frames.returncode != 0
  assert 'demo.frames=6 must be a positive multiple of 4' in frames.stderr
  assert unknown.returncode != 0 and 'nonexistent' in unknown.stderr
  assert size.returncode != 0 and "model size 'huge'" in size.stderr


@pytest.mark.slow
def test_stab_benchmark_prints_table_and_result_line():
  env = subprocess_env()
  r = subprocess.run([sys.executable, 'benchmarks/stab.py', '--image_size', '56', '--hidden',
                      '32', '--llm_hidden', '32', '--runs', '1', '--matmul_n', '128'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert any(l.startswith('reference math') for l in lines)
  assert lines[-1].startswith('RESULT gflop_per_video=')
  fields = dict(kv.split('=') for kv in lines[-1].split()[1:])
  assert set(fields) == {'gflop_per_video', 'ms_per_video', 'peak_fraction'}
  assert float(fields['ms_per_video']) > 0


@pytest.mark.slow
def test_generate_benchmark_prints_table_and_result_line():
  env = subprocess_env()
  r = subprocess.run([sys.executable, 'benchmarks/generate.py', '--vocab', '256', '--hidden',
                      '64', '--layers', '2', '--heads', '4', '--kv_heads', '2', '--head_dim',
                      '16', '--mlp', '128', '--prompt', '16', '--new', '4', '--runs', '1',
                      '--bandwidth_mib', '8'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert any(l.startswith('decode step, scanned') for l in lines)
  fields = dict(kv.split('=') for kv in lines[-1].split()[1:])
  assert lines[-1].startswith('RESULT ') and set(fields) == {'decode_tokens_per_s',
                                                             'bound_fraction'}
  # At this size a decode step is ~0.1 ms, below the timing noise of a loaded machine: the
  # figures must parse, their sign is not asserted.
  float(fields['decode_tokens_per_s']), float(fields['bound_fraction'])


def test_widths_derived_from_the_llm_and_teacher_follow_command_line_overrides():
  """`model.llm.hidden` and `model.teacher.hidden` are the only sources of the projector's, the
  distillation head's and the cached features' widths; the derived fields are not settable."""
  from absl import flags
  from ml_collections import config_flags
  from panda_jax import config as config_lib

  def parse(*overrides):         # as main.py's flag parses a command line
    argv = ['prog', f'--config={ROOT}/configs/stage2.py:tiny', *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config

  run = config_lib.resolve(parse('--config.model.llm.hidden=64',
                                 '--config.model.teacher.hidden=16',
                                 '--config.train.teacher=cached'))
  m = run.model
  assert m.llm.hidden == m.stab.llm_hidden == m.distill.llm_hidden == 64
  assert run.teacher.hidden == m.distill.teacher_hidden == 16
  assert run.batch['teacher'][0][-1] == 16
  default = config_lib.resolve(parse()).model
  assert default.stab.llm_hidden == default.llm.hidden == 128
  for derived in ('model.stab.llm_hidden', 'model.distill.teacher_hidden', 'model.llm_hidden'):
    with pytest.raises(Exception, match=derived.rsplit('.', 1)[1]):
      parse(f'--config.{derived}=64')
