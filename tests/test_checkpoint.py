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
CASE = golden.case_path('video_panda_tiny')


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


def test_restore_matching_reads_only_the_taken_shards(tmp_path, monkeypatch):
  """Matching variables restore straight into our shardings and dtypes: decided from the saved
  shapes, read through Orbax's sharded array handler (never as whole host arrays), the rest of
  the item not read at all; skip, require and the report as `merge_matching`'s."""
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from panda_jax.train import checkpoint as ckpt
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('fsdp', 'tensor'))
  rng = np.random.default_rng(0)
  f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
  saved = {'params': {'llm': {'embed': f32(16, 8), 'head': f32(8, 6), 'norm': f32(8)},
                      'visual': {'w': f32(4, 4)}},
           'batch_stats': {'stab': {'mean': f32(4)}}}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'variables', saved)
  ckptr.wait_until_finished()

  def ours(shape, spec, dtype=jnp.float32):
    return jax.device_put(jnp.zeros(shape, dtype), NamedSharding(mesh, spec))
  params = {'llm': {'embed': ours((16, 8), P('fsdp', 'tensor'), jnp.bfloat16),
                    'head': ours((8, 7), P()), 'norm': ours((8,), P())},
            'visual': {'w': ours((4, 4), P('fsdp'))}, 'new': {'x': ours((2,), P())}}
  stats = {'stab': {'mean': ours((4,), P('fsdp'))}}

  calls = {'array': [], 'numpy': []}
  for kind, cls in (('array', ocp.type_handlers.ArrayHandler),
                    ('numpy', ocp.type_handlers.NumpyHandler)):
    def spy(self, infos, args=None, _orig=cls.deserialize, _kind=kind):
      calls[_kind].extend(zip([i.name for i in infos], args or [None] * len(infos)))
      return _orig(self, infos, args)
    monkeypatch.setattr(cls, 'deserialize', spy)

  path = tmp_path / 'variables'
  new, new_stats, report = ckpt.restore_matching(
      params, stats, ckpt.SavedTree(path, 'params'), ckpt.SavedTree(path, 'batch_stats'),
      require=['llm/embed'], skip=['norm'])
  assert sorted(report['loaded']) == ['batch_stats/stab/mean', 'llm/embed', 'visual/w']
  assert sorted(report['fresh']) == ['llm/head', 'llm/norm', 'new/x']
  # (a) values, (b) our shardings and dtypes
  for got, want, mine in ((new['llm']['embed'], saved['params']['llm']['embed'],
                           params['llm']['embed']),
                          (new['visual']['w'], saved['params']['visual']['w'],
                           params['visual']['w']),
                          (new_stats['stab']['mean'], saved['batch_stats']['stab']['mean'],
                           stats['stab']['mean'])):
    assert got.sharding == mine.sharding and got.dtype == mine.dtype
    np.testing.assert_array_equal(np.asarray(got), want.astype(mine.dtype))
  assert new['llm']['head'] is params['llm']['head'] and new['new']['x'] is params['new']['x']
  # (d) read only the taken leaves, each as a sharded jax.Array of our sharding
  assert not calls['numpy']
  read = dict(calls['array'])
  assert sorted(read) == ['batch_stats.stab.mean', 'params.llm.embed', 'params.visual.w']
  assert read['params.llm.embed'].sharding == params['llm']['embed'].sharding
  assert read['params.llm.embed'].global_shape == (16, 8)
  # (c) a required variable not taken (skipped, or shaped otherwise) is an error naming it
  for require, skip in ((['llm/norm'], ['norm']), (['head'], [])):
    with pytest.raises(ValueError, match='required variables were not found.*llm/'):
      ckpt.restore_matching(params, stats, ckpt.SavedTree(path, 'params'), None, require, skip)
  # a plain decoder's tree maps under our `llm/`; the host-tree merge agrees
  dec, _, rep = ckpt.restore_matching(
      {'llm': params['llm']}, {}, ckpt.SavedTree(path, 'params/llm', 'llm/'), None)
  assert sorted(rep['loaded']) == ['llm/embed', 'llm/norm']
  host, _, rep2 = ckpt.merge_matching({'llm': params['llm']}, {}, saved['params'], {})
  assert rep2 == rep
  np.testing.assert_array_equal(np.asarray(host['llm']['norm']), np.asarray(dec['llm']['norm']))
  # a converted plain llama (`variables` = {'params': decoder}) fills our `llm/`, sharded
  from panda_jax import storage
  from panda_jax.convert.checkpoint import CONFIG_FILE, config_to_json
  from panda_jax.models.llama import LlamaConfig
  conv = tmp_path / 'conv'
  ckptr.save(conv / 'variables', {'params': saved['params']['llm']})
  ckptr.wait_until_finished()
  storage.write_json(conv / CONFIG_FILE, config_to_json('llama', LlamaConfig(hidden=8)))
  calls['array'].clear()
  got, _, rep = ckpt.load_converted_params(conv, params, {}, require=['llm/embed'])
  assert sorted(rep['loaded']) == ['llm/embed', 'llm/norm'] and not calls['numpy']
  assert sorted(dict(calls['array'])) == ['params.embed', 'params.norm']
  assert got['llm']['embed'].sharding == params['llm']['embed'].sharding
  np.testing.assert_array_equal(np.asarray(got['llm']['embed'], np.float32),
                                saved['params']['llm']['embed'].astype(jnp.bfloat16))


def test_importing_the_checkpoint_module_registers_nothing():
  # Orbax's global jax.Array handler is set by `manager` (before a save), not by an import.
  code = '''
import jax, orbax.checkpoint as ocp
before = ocp.type_handlers.get_type_handler(jax.Array)
from panda_jax.train import checkpoint as ckpt
assert ocp.type_handlers.get_type_handler(jax.Array) is before, 'registered at import'
ckpt.manager(__import__('tempfile').mkdtemp(), 1, 1)
after = ocp.type_handlers.get_type_handler(jax.Array)
assert after is not before and after._min_slice_bytes_for_replica_parallel == \\
    ckpt.MIN_REPLICA_PARALLEL_SLICE_BYTES
print('ok')
'''
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=subprocess_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-3000:]
