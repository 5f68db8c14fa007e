"""Shared config helpers: model sizes by name, validation, conversion to model dataclasses.

Config files under `configs/` are Python files with `get_config(arg)` returning a locked
`ml_collections.ConfigDict`; `arg` picks a variant (`configs/demo.py:tiny`). Fields are
overridden on the command line (`--config.model.stab.hidden=256`); unknown fields fail.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import ml_collections

from panda_jax.models.distill import DistillConfig, default_layers
from panda_jax.models.llama import LlamaConfig
from panda_jax.models.panda import PandaConfig
from panda_jax.models.stab import StabConfig
from panda_jax.models.teacher import TeacherConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Model sizes by name. '7b' is the released Video-Panda-7B; 'tiny' is for CPU tests and demos.
MODEL_SIZES = {
    '7b': dict(stab=dict(), llm=dict(), teacher_hidden=1024, teacher=dict()),
    'tiny': dict(stab=dict(hidden=64, heads=4, image_size=112, empty_frame_patches=4),
                 llm=dict(vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=4,
                          head_dim=32, mlp=256, max_positions=1024),
                 teacher_hidden=32,
                 teacher=dict(hidden=32, layers=3, heads=4, mlp=64, image_size=56,
                              num_frames=4)),
}


# Distillation teachers by name (`configs/stageN.py:teacher=clip`): the fields each sets in
# `model.teacher`. Another teacher is a new entry here (plus a module and a converter when its
# architecture differs).
TEACHERS = {
    # LanguageBind_Video_merge: CLIP ViT-L/14 + temporal attention, exact GELU (the paper's).
    'languagebind_video': dict(temporal=True, activation='gelu'),
    # OpenAI CLIP ViT-L/14 image tower, frame by frame (paper Table 10 ablation).
    'clip': dict(temporal=False, activation='quick_gelu'),
}


def model_config(size: str = '7b') -> ml_collections.ConfigDict:
  """The model section of a config for a named size."""
  if size not in MODEL_SIZES:
    raise ValueError(f'model size {size!r}; expected one of {sorted(MODEL_SIZES)}')
  spec = MODEL_SIZES[size]
  llm = dataclasses.asdict(LlamaConfig(**spec['llm']))
  stab = dataclasses.asdict(StabConfig(llm_hidden=llm['hidden'], **spec['stab']))
  distill = dict(teacher_hidden=spec['teacher_hidden'], heads=8,
                 layers=list(default_layers(llm['layers'])), loss=DistillConfig.loss)
  teacher = dataclasses.asdict(TeacherConfig(**spec['teacher']))
  return ml_collections.ConfigDict(dict(
      size=size, stab=stab, llm=llm, distill=distill, distill_weight=1.0, teacher=teacher,
      teacher_name='languagebind_video',
      llm_hidden=llm['hidden'], llm_layers=llm['layers'], dtype='float32',
      param_dtype='float32'))


def panda_config(model: ml_collections.ConfigDict) -> PandaConfig:
  """The whole-model dataclass from `config.model` (validated)."""
  llm = LlamaConfig(**model.llm.to_dict())
  if model.llm_hidden != llm.hidden or model.llm_layers != llm.layers:
    raise ValueError(f'model.llm_hidden/llm_layers ({model.llm_hidden}, {model.llm_layers}) '
                     f'differ from model.llm.hidden/layers ({llm.hidden}, {llm.layers})')
  cfg = PandaConfig(stab=stab_config(model), llm=llm, distill=distill_config(model),
                    distill_weight=model.distill_weight)
  cfg.validate()
  return cfg


def set_teacher(model: ml_collections.ConfigDict, name: str) -> None:
  """Makes `model` distill from the named teacher (see TEACHERS)."""
  if name not in TEACHERS:
    raise ValueError(f'teacher {name!r}; expected one of {sorted(TEACHERS)}')
  model.teacher_name = name
  for k, v in TEACHERS[name].items():
    setattr(model.teacher, k, v)


def teacher_config(model: ml_collections.ConfigDict) -> TeacherConfig:
  cfg = TeacherConfig(**model.teacher.to_dict())
  cfg.validate()
  name = model.get('teacher_name', 'languagebind_video')
  if name not in TEACHERS:
    raise ValueError(f'model.teacher_name={name!r}; expected one of {sorted(TEACHERS)}')
  clash = {k: v for k, v in TEACHERS[name].items() if getattr(cfg, k) != v}
  if clash:
    raise ValueError(f'model.teacher_name={name!r} needs model.teacher fields {clash}; the '
                     f'config has {({k: getattr(cfg, k) for k in clash})}')
  if cfg.hidden != model.distill.teacher_hidden:
    raise ValueError(f'model.teacher.hidden={cfg.hidden} differs from '
                     f'model.distill.teacher_hidden={model.distill.teacher_hidden}')
  return cfg


def cached_teacher(config) -> bool:
  """Whether distillation reads cached features (`train.teacher=cached`) rather than running
  the teacher in the train step (`online`)."""
  mode = config.train.get('teacher', 'online')
  if mode not in ('online', 'cached'):
    raise ValueError(f'train.teacher={mode!r}; expected "online" (the teacher runs in the '
                     'train step) or "cached" (features from panda_jax.teacher.extract)')
  return mode == 'cached'


def rules(config) -> tuple:
  """The logical-axis rules: `config.sharding_rules` when set, else the default table."""
  from panda_jax import sharding
  custom = config.get('sharding_rules') if hasattr(config, 'get') else None
  if custom:
    return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in custom)
  return sharding.DEFAULT_RULES


def dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f'dtype {name!r}; expected one of {sorted(DTYPES)}')
  return DTYPES[name]


def stab_config(model: ml_collections.ConfigDict) -> StabConfig:
  """The STAB dataclass from `config.model` (validated; LLM width taken from the model)."""
  fields = dict(model.stab.to_dict())
  if fields.get('llm_hidden') != model.llm_hidden:
    raise ValueError(f'model.stab.llm_hidden={fields.get("llm_hidden")} differs from '
                     f'model.llm_hidden={model.llm_hidden}; set them equal')
  cfg = StabConfig(**fields)
  cfg.validate()
  return cfg


def distill_config(model: ml_collections.ConfigDict) -> DistillConfig:
  cfg = DistillConfig(llm_hidden=model.llm_hidden, teacher_hidden=model.distill.teacher_hidden,
                      heads=model.distill.heads, layers=tuple(model.distill.layers),
                      # Configs saved before the ablation switch existed distilled with cosine.
                      loss=model.distill.get('loss', DistillConfig.loss))
  cfg.validate(model.llm_layers)
  return cfg


def save_resolved(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config to `workdir/config.json` and returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w') as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  return path


# Paper Table 6 and the released scripts.
STAGES = {
    1: dict(lr=4e-4, warmup_ratio=0.03, batch_size=2048, trainable=['^visual/', '^distill/'],
            data='Valley 351K (half of the 702K video-text pairs)'),
    2: dict(lr=4e-5, warmup_ratio=0.01, batch_size=2048, trainable=['.*'],
            data='Valley 702K video-text pairs'),
    3: dict(lr=2e-5, warmup_ratio=0.01, batch_size=1024, trainable=['.*'],
            data='Video-ChatGPT 100K instructions'),
}


def train_config(stage: int, arg: str = '') -> ml_collections.ConfigDict:
  """The config of one training stage.

  `arg` is a comma-separated list of options: `tiny` (the CPU-sized variant) and
  `teacher=NAME` (a teacher of TEACHERS), e.g. `configs/stage2.py:tiny,teacher=clip`.
  """
  if stage not in STAGES:
    raise ValueError(f'stage {stage}; expected 1, 2 or 3')
  options = [o for o in arg.split(',') if o]
  tiny = 'tiny' in options
  teacher = 'languagebind_video'
  for o in options:
    if o.startswith('teacher='):
      teacher = o[len('teacher='):]
    elif o != 'tiny':
      raise ValueError(f'config argument {arg!r}: unknown option {o!r}; expected "tiny" '
                       f'and/or "teacher=NAME" with NAME in {sorted(TEACHERS)}')
  st = STAGES[stage]
  c = ml_collections.ConfigDict()
  c.mode = 'train'
  c.stage = stage
  c.seed = 0
  c.model = model_config('tiny' if tiny else '7b')
  set_teacher(c.model, teacher)
  if not tiny:
    c.model.dtype = 'bfloat16'
    c.model.llm.remat = 'full'
    c.model.llm.attention_chunk = 512
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ml_collections.config_dict.placeholder(list)
  c.optim = ml_collections.ConfigDict(dict(
      lr=st['lr'] if not tiny else 2e-3, warmup_ratio=st['warmup_ratio'], end_lr_ratio=0.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
      trainable=list(st['trainable']), frozen=[], lr_scale=[]))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=4 if tiny else st['batch_size'], accum_steps=1,
      # -1: one epoch over the data set (the paper trains every stage for one epoch).
      steps=12 if tiny else -1,
      log_every=2 if tiny else 10, save_every=4 if tiny else 500, keep=3,
      # A step with a non-finite loss, gradient or BatchNorm statistic is refused (nothing
      # changes); the run stops with an error once more than this many were refused (counted
      # on the device, read at logging and saving steps).
      max_refused_steps=10,
      # Distillation targets: 'online' runs the teacher in the train step on the batch's
      # teacher frames; 'cached' reads features written by panda_jax.teacher.extract from
      # data.teacher_features (a synthetic run extracts them into its workdir itself).
      teacher='online'))
  c.data = ml_collections.ConfigDict(dict(
      annotations='', video_root='', frames=4 if tiny else 8,
      max_len=512 if tiny else 4096, tokenizer='', num_workers=0 if tiny else 8,
      shuffle_seed=0, synthetic_videos=24 if tiny else 0, description=st['data'],
      teacher_features='',
      # Packed ArrayRecord shards (panda_jax.data.packing) instead of annotations + videos:
      # the tfds data_dir and the packed set's config name (e.g. 'valley').
      packed='', packed_config='',
      # System prompt of the v1 template: 'videopanda_v1' ("curious human", the spec's and the
      # reference's inference template) or 'vicuna_v1' ("curious user", what the released
      # training scripts used via --version v1).
      system_prompt='videopanda_v1'))
  # from_run: an earlier stage's workdir; converted: `panda_jax.convert.checkpoint` output;
  # teacher: a LanguageBind video checkpoint directory (random only for tiny runs).
  c.init = ml_collections.ConfigDict(dict(
      from_run='', converted='', require=[], skip=[], teacher='', teacher_prefix='vision_model.'))
  return c
