"""LoRA of the decoder: off by default, exact at initialisation, merge, what trains, configs, and
a `:tiny,lora` stage-3 run through `python -m panda_jax.main`."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panda_jax import config as config_lib
from panda_jax.models import lora
from panda_jax.models.llama import Llama, LlamaConfig
from panda_jax.models.panda import VideoPanda
from panda_jax.train.optimizer import FROZEN, cast_frozen, make_optimizer, param_labels
from panda_jax.train.step import init_state, make_train_step
from panda_jax.tree import flatten
from test_predict import CFG
from test_train_step import optim_config, tiny_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = lora.LoraConfig(rank=4, alpha=8.0)
BASE = LlamaConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=48)


def _decoder(cfg, params, x, deterministic=True, rng=None):
  b, t = x.shape[:2]
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  rngs = {} if rng is None else {'dropout': rng}
  return Llama(cfg).apply({'params': params}, x, slots, jnp.ones((b, t), bool),
                          deterministic=deterministic, rngs=rngs)['logits']


@pytest.fixture(scope='module')
def decoder():
  """A tiny decoder with LoRA on every projection, its parameters and an input."""
  cfg = dataclasses.replace(BASE, lora=LORA)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, BASE.hidden))
  slots = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
  params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), x, slots,
                                    jnp.ones((2, 6), bool)))['params']
  return cfg, params, x


def _without_factors(params):
  return {k: _without_factors(v) for k, v in params.items()
          if k not in ('lora_a', 'lora_b')} if isinstance(params, dict) else params


def test_off_by_default_adds_no_parameter():
  config = config_lib.train_config(3, 'tiny')
  assert config.model.lora.rank == 0
  cfg = config_lib.panda_config(config.model)
  assert not cfg.llm.lora.enabled and cfg == dataclasses.replace(cfg, llm=dataclasses.replace(
      cfg.llm, lora=lora.LoraConfig()))
  shapes = jax.eval_shape(VideoPanda(CFG).init, jax.random.PRNGKey(0),
                          jax.tree.map(jnp.asarray, tiny_batch(b=1)))
  assert not any('lora' in k for k in flatten(nn.unbox(shapes)['params']))


def test_factors_sit_beside_the_targeted_kernels(decoder):
  cfg, params, _ = decoder
  flat = flatten(params)
  for name in lora.PROJECTIONS:
    kernel = flat[f'layers/{name}/kernel']
    a, b = flat[f'layers/{name}/lora_a'], flat[f'layers/{name}/lora_b']
    # [L, *in, r] and [L, r, *out] beside the kernel [L, *in, *out]; B starts at zero.
    assert a.shape[-1] == b.shape[1] == 4 and a.shape[0] == b.shape[0] == 2
    assert a.shape[1:-1] + b.shape[2:] == kernel.shape[1:]
    assert not np.any(b) and np.any(a)
  only_q = lora.LoraConfig(rank=2, targets=(r'attn/q/',))
  assert only_q.targeted() == {'attn/q'}
  with pytest.raises(ValueError, match='match none of the decoder projections'):
    lora.LoraConfig(rank=2, targets=('nothing',)).validate()


def test_at_initialisation_the_logits_equal_the_base_model(decoder):
  cfg, params, x = decoder
  with_lora = _decoder(cfg, params, x)
  base = _decoder(BASE, _without_factors(params), x)
  np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(base))


def test_merging_gives_the_unmerged_logits(decoder):
  cfg, params, x = decoder
  flat = flatten(params)
  trained = {k: (jax.random.normal(jax.random.PRNGKey(len(k)), v.shape) * 0.3
                 if k.endswith('lora_b') else v) for k, v in flat.items()}
  from panda_jax.tree import unflatten
  trained = unflatten(trained)
  unmerged = _decoder(cfg, trained, x)
  merged_params = lora.merge(trained, cfg.lora)
  assert set(flatten(merged_params)) == set(flatten(_without_factors(params)))
  merged = _decoder(BASE, merged_params, x)
  assert not np.allclose(unmerged, _decoder(BASE, _without_factors(params), x), atol=1e-3)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='rank 0'):
    lora.merge(trained, lora.LoraConfig())


def test_every_factor_is_split_over_fsdp_and_tensor():
  # fsdp 2 x tensor 2: no factor is whole on an fsdp shard. The rank goes over fsdp where the
  # model-width side is not there (B of q/k/v/gate/up, A of o/down: their other side is on
  # tensor); a rank fsdp does not divide stays whole.
  from panda_jax import sharding
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2}, jax.devices()[:4])
  x = jnp.zeros((2, 6, BASE.hidden))
  slots = jnp.zeros((2, 6), jnp.int32)

  def shardings(rank):
    cfg = dataclasses.replace(BASE, lora=lora.LoraConfig(rank=rank, alpha=8.0))
    boxed = jax.eval_shape(Llama(cfg).init, jax.random.PRNGKey(0), x, slots,
                           jnp.ones((2, 6), bool))
    return flatten(sharding.logical_shardings(boxed, mesh)['params'])

  even, odd = shardings(4), shardings(3)
  factors = [k for k in even if k.endswith(('lora_a', 'lora_b'))]
  assert len(factors) == 14
  for k in factors:
    spec = tuple(even[k].spec) + (None,) * 4
    assert 'fsdp' in spec, (k, spec)
    rank_dim = len(spec) - 5 if k.endswith('lora_a') else 1   # [layers, in..., rank] / [layers, rank, out...]
    by_rank = k.endswith('lora_b') == any(p in k for p in ('/q/', '/k/', '/v/', 'gate', 'up'))
    assert (spec[rank_dim] == 'fsdp') == by_rank, (k, spec)
    assert ('tensor' in spec) == by_rank, (k, spec)
    assert 'fsdp' not in tuple(odd[k].spec) or not by_rank, (k, odd[k].spec)
  assert even['layers/attn/q/kernel'].spec == odd['layers/attn/q/kernel'].spec


def test_dropout_only_when_not_deterministic(decoder):
  cfg, params, x = decoder
  flat = flatten(params)
  from panda_jax.tree import unflatten
  trained = unflatten({k: (jnp.ones_like(v) * 0.1 if k.endswith('lora_b') else v)
                       for k, v in flat.items()})
  drop = dataclasses.replace(cfg, lora=dataclasses.replace(LORA, dropout=0.5))
  plain = _decoder(cfg, trained, x)
  np.testing.assert_array_equal(_decoder(drop, trained, x), plain)
  a = _decoder(drop, trained, x, deterministic=False, rng=jax.random.PRNGKey(3))
  b = _decoder(drop, trained, x, deterministic=False, rng=jax.random.PRNGKey(4))
  assert not np.allclose(a, plain) and not np.allclose(a, b)


def test_the_train_step_gradients_reach_only_the_trainable_set():
  """The gradient tree of the real train step (return_grads; evaluated abstractly, nothing
  compiled) holds exactly the trainable set: every LoRA factor, the visual part and the
  distillation head, no base weight of the decoder; the frozen weights, kept in bfloat16, leave
  the step as they came. (The values: the `:tiny,lora` run below changes the factors and leaves
  the frozen weights bit for bit.)"""
  cfg = dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, lora=LORA))
  config = config_lib.train_config(3, 'tiny,lora')
  optim = optim_config(trainable=list(config.optim.trainable),
                       lr_scale=[list(x) for x in config.optim.lr_scale])
  model = VideoPanda(cfg)
  batch = jax.tree.map(jnp.asarray, tiny_batch())
  v = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch))
  labels = param_labels(flatten(v['params']).keys(), optim)
  params = cast_frozen(v['params'], labels, jnp.bfloat16)
  tx, schedules = make_optimizer(labels, optim, 10)
  state = jax.eval_shape(lambda p, s: init_state(p, s, labels, tx, jax.random.PRNGKey(1)),
                         params, v['batch_stats'])
  step = make_train_step(model, labels, tx, schedules, return_grads=True)
  new, metrics = jax.eval_shape(step, state, batch)
  grads = flatten(metrics['grads'])
  trainable = {k for k, g in labels.items() if g != FROZEN}
  factors = {k for k in labels if k.endswith(('/lora_a', '/lora_b'))}
  assert set(grads) == trainable
  assert len(factors) == 2 * len(lora.PROJECTIONS) and factors <= trainable
  assert {k for k in trainable if k.startswith('llm/')} == factors
  assert any(k.startswith('visual/') for k in grads) and any(k.startswith('distill/')
                                                             for k in grads)
  for k, g in labels.items():
    dtype = flatten(new.params)[k].dtype
    assert dtype == (jnp.float32 if g != FROZEN else jnp.bfloat16), (k, dtype)
    if g != FROZEN:
      assert grads[k].shape == flatten(params)[k].shape and grads[k].dtype == jnp.float32
  assert {g for g in labels.values() if g != FROZEN} == {'lr_x0.1', 'lr_x1'}


def test_lora_option_of_the_stage_configs():
  from configs import stage3
  full = stage3.get_config('')
  big, tiny = stage3.get_config('lora'), stage3.get_config('tiny,lora')
  assert (big.model.lora.rank, big.model.lora.alpha, big.optim.lr) == (128, 256.0, 2e-4)
  assert (big.train.batch_size, big.model.llm.loss_chunk) == (128, 512)
  assert tiny.model.lora.rank == 4 and tiny.model.size == 'tiny'
  for c in (big, tiny):
    assert c.optim.frozen_dtype == 'bfloat16'
    assert list(c.optim.trainable) == ['^visual/', '^distill/', lora.FACTOR_PATTERN]
    assert config_lib.panda_config(c.model).llm.lora.enabled
  assert full.model.lora.rank == 0 and full.optim.frozen_dtype == ''
  with pytest.raises(ValueError, match='"lora"'):
    stage3.get_config('tiny,lora2')
  # A workdir started before LoRA existed (no model.lora, no optim.frozen_dtype) resumes with
  # LoRA off, and not with it on.
  saved = config_lib._as_json(full)
  del saved['model']['lora'], saved['optim']['frozen_dtype']
  assert config_lib.config_differences(saved, config_lib._as_json(full)) == []
  assert config_lib.config_differences(saved, config_lib._as_json(big))


def test_a_tiny_lora_stage3_run_through_main(tmp_path):
  """`configs/stage3.py:tiny,lora` end to end: trains, saves the LoRA factors and bfloat16
  frozen weights; between steps 1 and 2 every factor B and the trained visual part change and
  every frozen weight stays bit for bit; the checkpoint merges into the base model's tree."""
  from panda_jax import workdir as workdir_lib
  from conftest import subprocess_env
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'panda_jax.main', '--config=configs/stage3.py:tiny,lora',
         f'--workdir={workdir}', '--config.train.steps=2', '--config.train.log_every=1',
         '--config.train.save_every=1', '--config.data.synthetic_videos=4']
  out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = config_lib.storage.read_json(workdir / 'summary.json')
  assert summary['step'] == 2 and np.isfinite(summary['loss'])
  step, params, _ = workdir_lib.restore_variables(workdir)
  flat = flatten(params)
  assert step == 2 and any(k.endswith('/lora_b') for k in flat)
  first = flatten(workdir_lib._host_tree(workdir / 'checkpoints' / '1' / 'params'))
  config = config_lib.train_config(3, 'tiny,lora')
  labels = param_labels(flat.keys(), config.optim)
  for k, g in labels.items():
    if g == FROZEN:
      np.testing.assert_array_equal(flat[k], first[k], err_msg=k)
    elif k.endswith('/lora_b'):
      assert np.any(flat[k]) and not np.array_equal(flat[k], first[k]), k
  assert not np.array_equal(flat['visual/projector/fc1/kernel'],
                            first['visual/projector/fc1/kernel'])
  assert flat['llm/layers/attn/q/kernel'].dtype == jnp.bfloat16
  assert flat['llm/layers/attn/q/lora_a'].dtype == np.float32
  saved = config_lib.storage.read_json(workdir / 'config.json')
  cfg = config_lib.panda_config(config_lib.ml_collections.ConfigDict(saved['model']))
  merged = flatten(lora.merge(params, cfg.llm.lora))
  assert not any('lora' in k for k in merged)
  assert set(merged) == {k for k in flat if 'lora' not in k}


def test_configs_name_bad_values_and_survive_json():
  for bad, match in ((dict(rank=-1), 'rank=-1'), (dict(rank=4, dropout=1.0), 'dropout=1.0'),
                     (dict(rank=4, alpha=0.0), 'alpha=0.0'),
                     (dict(rank=4, targets=('(',)), "invalid regex '\\('")):
    with pytest.raises(ValueError, match=match):
      lora.LoraConfig(**bad).validate()
  with pytest.raises(ValueError, match="optim.frozen_dtype='float16'"):
    from panda_jax.train.optimizer import frozen_dtype
    frozen_dtype(config_lib.ml_collections.ConfigDict(dict(frozen_dtype='float16')))
  # A converted checkpoint's config.json holds the decoder config as JSON (lists for tuples).
  import json
  cfg = dataclasses.replace(BASE, lora=LORA)
  assert LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
