"""A tiny checkpoint in the authors' released layout converts and reproduces their model."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_env
from panda_jax import golden
from panda_jax.convert import hf_io
from panda_jax.convert.checkpoint import convert_directory, load_converted
from panda_jax.convert.common import ConversionError
from panda_jax.data.assembly import layout_batch
from panda_jax.models.panda import VideoPanda
from test_hf_io import _Storage, _Tensor, _write_torch_zip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = golden.default_dir() / 'video_panda_tiny.npz'


@pytest.fixture(scope='module')
def case():
  return golden.load_case(CASE)


def _hf_config(meta):
  llm = dict(meta['sizes']['llm'])
  return dict(llm, model_type='videopanda_llama', architectures=['VideoPandaLlamaForCausalLM'],
              max_position_embeddings=4096, mm_hidden_size=meta['sizes']['stab']['width'])


def _released_state(params):
  """The golden's tensors plus what a released file also holds: aliases and lmhra2."""
  state = dict(params)
  for k, v in params.items():
    if k.startswith('model.video_tower.'):
      state['model.vision_tower.' + k[len('model.video_tower.'):]] = v
      if '.lmhra1.' in k:
        state[k.replace('.lmhra1.', '.lmhra2.')] = v
    if k.startswith('model.video_projector.'):
      state['model.mm_projector.' + k[len('model.video_projector.'):]] = v
  return state


def _write_safetensors_shards(directory, state):
  names = sorted(state)
  half = len(names) // 2
  shards = {'model-00001-of-00002.safetensors': names[:half],
            'model-00002-of-00002.safetensors': names[half:]}
  for fname, keys in shards.items():
    hf_io.save_safetensors(directory / fname, {k: state[k] for k in keys})
  index = {'metadata': {}, 'weight_map': {k: f for f, ks in shards.items() for k in ks}}
  (directory / 'model.safetensors.index.json').write_text(json.dumps(index))


def _write_bin_shards(directory, state):
  names = sorted(state)
  shards = {'pytorch_model-00001-of-00002.bin': names[::2],
            'pytorch_model-00002-of-00002.bin': names[1::2]}
  for fname, keys in shards.items():
    storages, tensors = [], {}
    for i, k in enumerate(keys):
      a = np.asarray(state[k])
      st = _Storage(str(i), a)
      storages.append(st)
      strides = tuple(int(np.prod(a.shape[j + 1:])) for j in range(a.ndim))
      tensors[k] = _Tensor(st, 0, a.shape, strides)
    _write_torch_zip(directory / fname, tensors, storages)
  index = {'metadata': {}, 'weight_map': {k: f for f, ks in shards.items() for k in ks}}
  (directory / 'pytorch_model.bin.index.json').write_text(json.dumps(index))


def _logits(cfg, variables, meta, inputs, length):
  pixels, mask = golden.reference_frames_to_ours(inputs['frames'])
  lay = layout_batch(inputs['input_ids'], inputs['labels'], inputs['attention_mask'], mask,
                     cfg.stab, max_len=length)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()}, pixels=jnp.asarray(pixels),
               mask=jnp.asarray(mask), teacher=jnp.asarray(inputs['teacher_features']),
               teacher_valid=jnp.ones(mask.shape[:2], bool))
  out = jax.jit(lambda v, b: VideoPanda(cfg).apply(v, b))(variables, batch)
  return np.asarray(out['logits']), lay['valid'], out


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['safetensors', 'bin'])
def test_released_layout_converts_and_reproduces_the_reference(tmp_path, case, fmt):
  meta, params, inputs, outputs, _ = case
  src = tmp_path / 'released'
  src.mkdir()
  (src / 'config.json').write_text(json.dumps(_hf_config(meta)))
  state = _released_state(params)
  (_write_safetensors_shards if fmt == 'safetensors' else _write_bin_shards)(src, state)
  cfg = convert_directory(src, tmp_path / 'converted', llm_dtype='float32', image_size=224)
  assert cfg.stab.hidden == 128 and cfg.distill.layers == (4, 0)
  assert cfg.distill.teacher_hidden == 32
  model_name, cfg2, variables = load_converted(tmp_path / 'converted')
  assert model_name == 'video_panda' and cfg2 == cfg
  logits, valid, out = _logits(cfg, variables, meta, inputs, outputs['logits'].shape[1])
  tol = golden.RTOL * max(1.0, np.abs(outputs['logits']).max())
  assert np.abs(logits[valid] - outputs['logits'][valid]).max() <= tol
  np.testing.assert_allclose(out['loss'], outputs['loss'], rtol=2e-4)


def test_missing_and_unexpected_names_are_all_reported(tmp_path, case):
  meta, params, *_ = case
  from panda_jax.convert.panda import convert_panda
  from panda_jax.golden import panda_config_from_meta
  cfg = panda_config_from_meta(meta)
  state = dict(params)
  del state['model.layers.2.mlp.up_proj.weight']
  del state['model.video_tower.balance']
  state['model.layers.0.self_attn.rotary_emb.weird'] = np.zeros(2)
  with pytest.raises(ConversionError) as e:
    convert_panda(state, cfg)
  msg = str(e.value)
  assert 'layers/mlp/up/kernel for layers [2]' in msg
  assert 'model.video_tower.balance' in msg
  assert 'model.layers.0.self_attn.rotary_emb.weird' in msg


@pytest.mark.slow
def test_command_line_converts_and_refuses_to_overwrite(tmp_path, case):
  meta, params, *_ = case
  src = tmp_path / 'released'
  src.mkdir()
  (src / 'config.json').write_text(json.dumps(_hf_config(meta)))
  _write_safetensors_shards(src, dict(params))
  cmd = [sys.executable, '-m', 'panda_jax.convert.checkpoint', f'--src={src}',
         f'--dst={tmp_path / "out"}', '--image_size=224', '--llm_dtype=bfloat16']
  env = subprocess_env()      # one device and this session's compilation cache
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  _, cfg, variables = load_converted(tmp_path / 'out')
  assert variables['params']['llm']['layers']['attn']['q']['kernel'].dtype == jnp.bfloat16
  assert variables['params']['visual']['stab']['balance'].dtype == jnp.float32
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and 'already exists' in r.stderr
