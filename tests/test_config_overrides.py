"""config.apply_overrides: the one way dotted overrides reach a config (demo variants, aot_7b)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env
from panda_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sets_nested_fields_and_refuses_unknown_ones():
  c = config_lib.train_config(2, 'tiny')
  config_lib.apply_overrides(c, {'model.stab.lste': False, 'model.llm.loss_chunk': 64,
                                 'train.steps': 3})
  assert (c.model.stab.lste, c.model.llm.loss_chunk, c.train.steps) == (False, 64, 3)
  with pytest.raises(KeyError, match="override 'model.stab.lstee': no field 'lstee'"):
    config_lib.apply_overrides(c, {'model.stab.lstee': True})
  with pytest.raises(KeyError, match="override 'modle.stab.lste': no field 'modle'"):
    config_lib.apply_overrides(c, {'modle.stab.lste': True})
  assert c.model.stab.lste is False


@pytest.mark.parametrize('llm_layers, expected', [
    (4, (4, 0)), (8, (8, 4, 0)), (32, tuple(range(32, -1, -4))), (2, (2, 1, 0)), (1, (1, 0))])
def test_distillation_layers_follow_the_llm_depth_unless_set(llm_layers, expected):
  c = config_lib.train_config(2, 'tiny')
  assert c.model.distill.layers is None
  config_lib.apply_overrides(c, {'model.llm.layers': llm_layers})
  assert config_lib.panda_config(c.model).distill.layers == expected
  config_lib.apply_overrides(c, {'model.distill.layers': (1, 0)})
  assert config_lib.panda_config(c.model).distill.layers == (1, 0)


def test_distillation_layers_from_the_command_line():
  code = ('from absl import app, flags\n'
          'from ml_collections import config_flags\n'
          'from panda_jax import config as config_lib\n'
          'C = config_flags.DEFINE_config_file("config")\n'
          'app.run(lambda _: print(config_lib.panda_config(C.value.model).distill.layers))\n')
  out = subprocess.run([sys.executable, '-c', code, '--config=configs/stage2.py:tiny',
                        '--config.model.llm.layers=8'], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.strip() == '(8, 4, 0)', out.stderr[-2000:]
  out = subprocess.run([sys.executable, '-c', code, '--config=configs/stage2.py:tiny',
                        '--config.model.distill.layers=(4,2,0)'], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.strip() == '(4, 2, 0)', out.stderr[-2000:]


def test_a_workdir_refuses_a_config_that_changes_results(tmp_path):
  """config.json records the resolved config and the code version; a later command may change
  how often it logs and saves, the layout and the step count, nothing that changes results."""
  from configs import stage2
  from panda_jax import config as config_lib
  c = stage2.get_config('tiny')
  config_lib.save_resolved(c, str(tmp_path), code_version='abc123')
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['code_version'] == 'abc123' and saved['train']['steps'] == c.train.steps
  same = stage2.get_config('tiny')
  same.train.steps, same.train.log_every, same.mesh.fsdp = 99, 7, 2
  same.model.llm.remat = 'full'
  config_lib.check_resumable(same, str(tmp_path))
  other = stage2.get_config('tiny')
  other.seed, other.optim.lr = 5, 0.5
  with pytest.raises(config_lib.ConfigMismatchError) as e:
    config_lib.save_resolved(other, str(tmp_path))
  assert f'optim.lr: {c.optim.lr!r} -> 0.5; seed: 0 -> 5' in str(e.value)
  assert json.load(open(tmp_path / 'config.json')) == saved     # nothing written
  assert config_lib.config_differences({'a': {'b': 1}}, {'a': {}}) == ["a.b: 1 -> '(absent)'"]
