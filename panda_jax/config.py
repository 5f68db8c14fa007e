"""Shared config helpers: model sizes by name, and `resolve`, which turns a config into the typed,
validated dataclasses the code below the entry points takes (`Run`).

Config files under `configs/` are Python files with `get_config(arg)` returning a locked
`ml_collections.ConfigDict`; `arg` picks a variant (`configs/demo.py:tiny`). Fields are
overridden on the command line (`--config.model.stab.hidden=256`); unknown fields fail.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from panda_jax import storage
from panda_jax.models.distill import DistillConfig, default_layers
from panda_jax.models import lora as lora_lib
from panda_jax.models.llama import LlamaConfig
from panda_jax.models.panda import PandaConfig
from panda_jax.models.stab import StabConfig
from panda_jax.models.teacher import TeacherConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Model sizes by name. '7b' is the released Video-Panda-7B; 'tiny' is for CPU tests and demos.
# Widths that one part takes from another (the projector's and the distillation head's LLM
# width, the head's teacher width) are not fields: `resolve` derives them from `model.llm` and
# `model.teacher`, so `--config.model.llm.hidden=...` changes every one of them.
MODEL_SIZES = {
    '7b': dict(stab=dict(), llm=dict(), teacher=dict()),
    'tiny': dict(stab=dict(hidden=64, heads=4, image_size=112, empty_frame_patches=4),
                 llm=dict(vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=4,
                          head_dim=32, mlp=256, max_positions=1024),
                 teacher=dict(hidden=32, layers=3, heads=4, mlp=64, image_size=56,
                              num_frames=4)),
}

# Fields of the model dataclasses that are derived, never configured (see MODEL_SIZES), or
# configured elsewhere (the decoder's LoRA is `model.lora`).
_DERIVED = {'stab': ('llm_hidden',), 'distill': ('llm_hidden', 'teacher_hidden'),
            'llm': ('lora',)}


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
  llm.pop('lora')
  stab = {k: v for k, v in dataclasses.asdict(StabConfig(**spec['stab'])).items()
          if k not in _DERIVED['stab']}
  # layers None: every 4th LLM hidden state from the last, as released (`distill_layers`), so
  # overriding `llm.layers` alone keeps the rule; a tuple overrides it.
  distill = dict(heads=8, layers=ml_collections.config_dict.placeholder(tuple),
                 loss=DistillConfig.loss)
  teacher = dataclasses.asdict(TeacherConfig(**spec['teacher']))
  return ml_collections.ConfigDict(dict(
      size=size, stab=stab, llm=llm, distill=distill, distill_weight=1.0, teacher=teacher,
      teacher_name='languagebind_video', dtype='float32', param_dtype='float32',
      # LoRA of the decoder (panda_jax/models/lora.py): rank 0 = off, no parameter added.
      lora=dataclasses.asdict(lora_lib.LoraConfig())))


def _section(model, name: str) -> dict:
  """`model.<name>` as a dict, without the derived fields (a config written before they were
  derived holds them; they then equal what is derived, as the code of that time checked)."""
  d = dict(model[name].to_dict() if hasattr(model[name], 'to_dict') else model[name])
  for k in _DERIVED.get(name, ()):
    d.pop(k, None)
  return d


def distill_layers(num_llm_layers: int) -> tuple[int, ...]:
  """The LLM hidden states the distillation head reads when `model.distill.layers` is None:
  every 4th from the last, as released ([32, 28, ..., 0] for 32 layers, [4, 0] for the tiny 4);
  at least two (the head's query and one key/value layer), so fewer than 4 layers take every
  `num_llm_layers // 2`-th."""
  layers = default_layers(num_llm_layers)
  return layers if len(layers) >= 2 else default_layers(num_llm_layers,
                                                        step=max(1, num_llm_layers // 2))


def panda_config(model: ml_collections.ConfigDict) -> PandaConfig:
  """The whole-model dataclass from `config.model` (validated); the STAB's and the distillation
  head's LLM width and the head's teacher width are the LLM's and the teacher's."""
  lora = model.get('lora')                 # absent in configs written before LoRA
  lora = lora_lib.from_dict(lora.to_dict() if hasattr(lora, 'to_dict') else lora)
  llm = LlamaConfig(lora=lora, **_section(model, 'llm'))
  teacher = TeacherConfig(**_section(model, 'teacher'))
  stab = StabConfig(llm_hidden=llm.hidden, **_section(model, 'stab'))
  d = _section(model, 'distill')
  distill = DistillConfig(llm_hidden=llm.hidden, teacher_hidden=teacher.hidden,
                          heads=d['heads'],
                          layers=(distill_layers(llm.layers) if d.get('layers') is None
                                  else tuple(d['layers'])),
                          # Configs saved before the ablation switch existed distilled with cosine.
                          loss=d.get('loss', DistillConfig.loss))
  cfg = PandaConfig(stab=stab, llm=llm, distill=distill, distill_weight=model.distill_weight)
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
  """The teacher dataclass from `config.model` (validated against `model.teacher_name`)."""
  cfg = TeacherConfig(**_section(model, 'teacher'))
  cfg.validate()
  name = model.get('teacher_name', 'languagebind_video')
  if name not in TEACHERS:
    raise ValueError(f'model.teacher_name={name!r}; expected one of {sorted(TEACHERS)}')
  clash = {k: v for k, v in TEACHERS[name].items() if getattr(cfg, k) != v}
  if clash:
    raise ValueError(f'model.teacher_name={name!r} needs model.teacher fields {clash}; the '
                     f'config has {({k: getattr(cfg, k) for k in clash})}')
  return cfg


def stab_config(model: ml_collections.ConfigDict) -> StabConfig:
  """The STAB dataclass from `config.model` (validated; LLM width taken from the LLM)."""
  return panda_config(model).stab


TEACHER_MODES = ('online', 'cached')


def rules(config) -> tuple:
  """The logical-axis rules: `config.sharding_rules` when set, else the default table; every
  rule names mesh axes that exist."""
  from panda_jax import sharding
  custom = config.get('sharding_rules') if hasattr(config, 'get') else None
  if not custom:
    return sharding.DEFAULT_RULES
  out = []
  for rule in custom:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'sharding_rules entry {rule!r}; expected [logical name, mesh axes]')
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    named = axes if isinstance(axes, tuple) else (() if axes is None else (axes,))
    bad = [a for a in named if a not in sharding.MESH_AXES]
    if bad:
      raise ValueError(f'sharding_rules entry {rule!r}: unknown mesh axes {bad}; expected '
                       f'{list(sharding.MESH_AXES)}')
    out.append((name, axes))
  return tuple(out)


def dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f'dtype {name!r}; expected one of {sorted(DTYPES)}')
  return DTYPES[name]


class BatchSpec(Mapping):
  """Shapes and dtypes of a global training batch: {field: ((dims), numpy dtype)}."""

  def __init__(self, fields: Mapping[str, tuple[tuple[int, ...], Any]]):
    self._fields = dict(fields)

  def __getitem__(self, key):
    return self._fields[key]

  def __iter__(self):
    return iter(self._fields)

  def __len__(self):
    return len(self._fields)

  def __repr__(self):
    return f'BatchSpec({self._fields})'

  def zeros(self, batch: int = 1) -> dict[str, np.ndarray]:
    """A zero batch of `batch` rows (parameter shapes do not depend on the batch)."""
    return {k: np.zeros((batch,) + s[1:], d) for k, (s, d) in self._fields.items()}


def batch_spec(model: PandaConfig, teacher: TeacherConfig, compute_dtype, batch_size: int,
               frames: int, max_len: int, cached_teacher: bool) -> BatchSpec:
  """A global training batch (teacher frames for the online teacher, teacher features for
  cached distillation)."""
  # Frames travel in the compute dtype (the STAB and the teacher cast them to it first thing,
  # so bfloat16 frames change no result and halve the batch) and the 0/1 mask as uint8.
  px = np.dtype(compute_dtype)
  b, f, l = batch_size, frames, max_len
  s, st = model.stab.image_size, model.stab.lsd_grid ** 2
  # Targets live on the teacher's grid, G / lsd_stride (= the LSD grid, or half the token grid
  # with downsample='none', whose tokens share their teacher cell: see layout_batch).
  distill = model.distill.loss != 'none'
  if distill and teacher.grid != model.stab.target_grid:
    raise ValueError(f'the teacher\'s {teacher.grid}x{teacher.grid} patch grid does not match '
                     f'the student\'s {model.stab.target_grid}x{model.stab.target_grid} '
                     f'distillation grid (patch grid {model.stab.grid} / lsd_stride '
                     f'{model.stab.lsd_stride})')
  extra = {}
  if distill and cached_teacher:
    extra = {'teacher': ((b, f, teacher.grid ** 2, teacher.hidden), np.float32)}
  elif distill:
    extra = {'teacher_pixels': ((b, f, teacher.image_size, teacher.image_size, 3), px)}
  return BatchSpec({
      'pixels': ((b, f, s, s, 3), px), 'mask': ((b, f, s, s), np.uint8),
      'text_ids': ((b, l), np.int32), 'visual_index': ((b, l), np.int32),
      'valid': ((b, l), np.bool_), 'labels': ((b, l), np.int32),
      'patch_pos': ((b, f, st), np.int32), 'patch_valid': ((b, f, st), np.bool_),
      'teacher_cell': ((b, f, st), np.int32),
      'teacher_valid': ((b, f), np.bool_), **extra})


@dataclasses.dataclass(frozen=True)
class Run:
  """A training config resolved once, at the entry (`resolve`): the typed, validated pieces
  the layers below need, so none of them reads `config.model`, the mesh or the rules again."""
  model: PandaConfig
  teacher: TeacherConfig
  size: str                        # 'tiny' allows a randomly initialised teacher
  dtype: Any                       # compute dtype
  param_dtype: Any
  mesh: Mapping[str, int]          # mesh axis sizes as configured (-1: fill)
  rules: tuple                     # logical-axis rules
  batch: BatchSpec
  cached_teacher: bool             # distillation targets from cached features

  @property
  def distill(self) -> bool:
    return self.model.distill.loss != 'none'

  @property
  def online_teacher(self) -> bool:
    """Whether the teacher runs inside the train step."""
    return self.distill and not self.cached_teacher


def resolve(config) -> Run:
  """The training config -> `Run` (every check on the model, teacher, mesh, rules and batch
  made here, once)."""
  from panda_jax import sharding
  model = panda_config(config.model)
  teacher = teacher_config(config.model)
  mode = config.train.get('teacher', 'online')
  if mode not in TEACHER_MODES:
    raise ValueError(f'train.teacher={mode!r}; expected "online" (the teacher runs in the '
                     'train step) or "cached" (features from panda_jax.teacher.extract)')
  from panda_jax.data import templates
  try:
    templates.get(config.data.get('system_prompt', templates.DEFAULT))
  except ValueError as e:
    raise ValueError(f'data.system_prompt: {e}') from e
  mesh = dict(config.mesh.to_dict())
  unknown = sorted(set(mesh) - set(sharding.MESH_AXES))
  if unknown:
    raise ValueError(f'mesh axes {unknown}; expected {list(sharding.MESH_AXES)}')
  table = rules(config)
  if not sharding.batch_axes(table):
    raise ValueError('the sharding rules map "batch" to no mesh axis; every device would hold '
                     'the whole batch (map it to data and/or fsdp)')
  dt = dtype(config.model.dtype)
  batch = batch_spec(model, teacher, dt, config.train.batch_size, config.data.frames,
                     config.data.max_len, mode == 'cached')
  return Run(model=model, teacher=teacher, size=config.model.get('size', ''), dtype=dt,
             param_dtype=dtype(config.model.param_dtype), mesh=mesh, rules=table, batch=batch,
             cached_teacher=mode == 'cached')


# Fields a later command in the same workdir may change without mixing two runs: how often it
# logs and saves, the input pipeline's parallelism, how the same computation is laid out and
# rematerialised, more steps (a stage continued), and the code version.
RESUMABLE_CHANGES = ('train.steps', 'train.log_every', 'train.save_every', 'train.keep',
                     'train.max_refused_steps', 'train.accum_steps', 'data.num_workers',
                     'data.read_threads', 'data.video_cache_mb', 'mesh.', 'sharding_rules',
                     'model.llm.remat', 'model.llm.attention_chunk', 'model.llm.attention_impl',
                     'model.llm.attention_interpret', 'model.llm.loss_chunk',
                     'model.llm.loss_positions', 'eval.batch_size', 'code_version')


class ConfigMismatchError(ValueError):
  """A workdir holds a run started with another config (fields that change results differ)."""


def _flat_fields(tree: Mapping, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_fields(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# Fields added after runs were started, by prefix: absent from a saved config, they are no
# difference while the current config leaves them as the code before them behaved (LoRA off,
# frozen parameters in model.param_dtype).
ADDED_FIELDS = {'model.lora.': lambda flat: flat.get('model.lora.rank') == 0,
                'optim.frozen_dtype': lambda flat: flat.get('optim.frozen_dtype') == ''}


def config_differences(saved: Mapping, config: Mapping) -> list[str]:
  """'field: saved -> now' for every field of two resolved configs (as JSON) that differs and
  changes results (not in RESUMABLE_CHANGES); a field only one of them has counts too, except
  a field of ADDED_FIELDS that the saved config predates, left as the code before it behaved."""
  a, b = _flat_fields(saved), _flat_fields(config)
  added = [f for f, as_before in ADDED_FIELDS.items()
           if not any(k.startswith(f) for k in a) and as_before(b)]
  free = lambda k: any(k == f or (f.endswith('.') and k.startswith(f))
                       for f in RESUMABLE_CHANGES + tuple(added))
  missing = object()
  return [f'{k}: {a.get(k, "(absent)")!r} -> {b.get(k, "(absent)")!r}'
          for k in sorted(set(a) | set(b))
          if not free(k) and a.get(k, missing) != b.get(k, missing)]


def save_resolved(config: ml_collections.ConfigDict, workdir: str, code_version: str = '',
                  check: bool = True) -> str:
  """Writes the resolved config (with `code_version` when given) to `workdir/config.json` and
  returns the path. With `check`, a workdir whose config.json differs in a field that changes
  results (`config_differences`) is refused with ConfigMismatchError naming the fields."""
  if check:
    check_resumable(config, workdir)
  path = storage.join(workdir, 'config.json')
  new = _as_json(config)
  if code_version:
    new['code_version'] = code_version
  storage.write_json(path, new, indent=2, sort_keys=True)
  return path


def _as_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigMismatchError naming the fields when `workdir/config.json` holds a config
  that differs from `config` in a field that changes results (none there: nothing to check)."""
  path = storage.join(workdir, 'config.json')
  if not storage.exists(path):
    return
  diffs = config_differences(storage.read_json(path), _as_json(config))
  if diffs:
    raise ConfigMismatchError(
        f'{workdir} holds a run started with another config; fields that change results '
        f'differ ({len(diffs)}): {"; ".join(diffs[:12])}. Use a fresh --workdir, or '
        '--overwrite to delete that run and start over')


# Paper Table 6 and the released scripts.
STAGES = {
    1: dict(lr=4e-4, warmup_ratio=0.03, batch_size=2048, trainable=['^visual/', '^distill/'],
            data='Valley 351K (half of the 702K video-text pairs)'),
    2: dict(lr=4e-5, warmup_ratio=0.01, batch_size=2048, trainable=['.*'],
            data='Valley 702K video-text pairs'),
    3: dict(lr=2e-5, warmup_ratio=0.01, batch_size=1024, trainable=['.*'],
            data='Video-ChatGPT 100K instructions'),
}


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted fields (`model.stab.lste=False`) of an unlocked config; a field the config does
  not have raises KeyError naming it (no new fields are made)."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      if p not in node:
        raise KeyError(f'override {key!r}: no field {p!r}')
      node = node[p]
    if last not in node:
      raise KeyError(f'override {key!r}: no field {last!r}')
    node[last] = value


# Pod layouts by name (`pod_layout`'s arguments), the same for the three stages (each stage's
# own sweep rows ranked the same one first; configs/stageN.py: `LAYOUTS`). Per-chip GiB by the
# TPU compiler, and two modelled step times per row, neither measured on a TPU: the no-overlap
# bound (compute + HBM + ICI time added up) and the perfect-overlap ceiling (their maximum);
# rows are ranked by the bound (docs/benchmarks.md, "Layout sweep"; records in
# benchmarks/results/sweep_tpu.jsonl, libtpu 0.0.42.1, 2026-12-01, from hand-counted terms).
#  v5e-64: first of 18 v5e:8x8 rows for each stage: 11.9 / 14.6 / 14.3 GiB of 16 for stages
#          1 / 2 / 3; bound 48.0 / 52.3 / 52.3 % MFU, ceiling 94.0 / 95.6 / 95.6 %.
#  v5p-64: v5e-64's layout at the micro-batch a v5p chip's 95 GiB allow: 76.8 / 78.4 / 77.9 GiB;
#          bound 61.2 / 68.2 / 68.2 %, ceiling 94.0 / 95.6 / 95.6 % (first of 4 stage-2 rows).
#  v6e-64: the same at micro-batch 2 for a v6e chip's 32 GiB: 21.4 / 24.4 / 24.0 GiB; bound
#          32.0 / 37.5 / 37.5 %, ceiling 57.6 / 80.2 / 80.1 % (first of 4 rows).
# The compiled program's own counts (benchmarks/hlo_cost.py), where recomputed, put the stage-2
# v5e step at a bound of about 20 % (HBM traffic 4x the hand count): docs/benchmarks.md, "What the figures
# are".
POD_LAYOUTS = {
    name: dict(chips=64, fsdp=32, tensor=2, micro_batch=mb, remat='dots_no_batch',
               attention_chunk=512)
    for name, mb in (('v5e-64', 1), ('v5p-64', 8), ('v6e-64', 2))}


def pod_layout(config: ml_collections.ConfigDict, chips: int, fsdp: int, tensor: int,
               micro_batch: int, remat: str, attention_chunk: int) -> None:
  """Lays an (unlocked) 7B training config out for a pod of `chips` devices: mesh data x fsdp x
  tensor with data = chips / (fsdp x tensor), the LLM's remat policy and attention query block,
  and the accumulation steps that keep the configured (paper) batch at `micro_batch` sequences
  per batch shard (data x fsdp) per accumulation step. The named variants (`v5e-64` in
  configs/stageN.py) use it with the layout a sweep picked (benchmarks/sweep_tpu.py)."""
  if chips % (fsdp * tensor):
    raise ValueError(f'fsdp {fsdp} x tensor {tensor} does not divide {chips} chips')
  data = chips // (fsdp * tensor)
  per_step = micro_batch * data * fsdp
  if config.train.batch_size % per_step:
    raise ValueError(f'batch {config.train.batch_size} is not a multiple of micro-batch '
                     f'{micro_batch} x {data * fsdp} batch shards')
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  config.train.accum_steps = config.train.batch_size // per_step
  config.model.llm.remat = remat
  config.model.llm.attention_chunk = attention_chunk


def train_config(stage: int, arg: str = '',
                 layouts: Mapping[str, Mapping[str, Any]] | None = None
                 ) -> ml_collections.ConfigDict:
  """The config of one training stage.

  `arg` is a comma-separated list of options: `tiny` (the CPU-sized variant),
  `teacher=NAME` (a teacher of TEACHERS), `lora` (the decoder fine-tuned through LoRA factors
  while its base weights stay frozen, in bfloat16; `lora_options`) and at most one pod layout
  named in `layouts` (configs/stageN.py's LAYOUTS: `pod_layout`'s arguments by name), e.g.
  `configs/stage2.py:tiny,teacher=clip`, `configs/stage3.py:lora` or `configs/stage2.py:v5e-64`.
  """
  if stage not in STAGES:
    raise ValueError(f'stage {stage}; expected 1, 2 or 3')
  layouts = layouts or {}
  options = [o for o in arg.split(',') if o]
  tiny = 'tiny' in options
  teacher = 'languagebind_video'
  named = [o for o in options if o in layouts]
  if len(named) > 1:
    raise ValueError(f'config argument {arg!r}: more than one pod layout {named}')
  for o in options:
    if o.startswith('teacher='):
      teacher = o[len('teacher='):]
    elif o not in ('tiny', 'lora') and o not in layouts:
      raise ValueError(f'config argument {arg!r}: unknown option {o!r}; expected "tiny", '
                       f'"lora", "teacher=NAME" with NAME in {sorted(TEACHERS)} and/or one pod '
                       f'layout of {sorted(layouts)}')
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
      trainable=list(st['trainable']), frozen=[], lr_scale=[],
      # The dtype frozen parameters are kept in ('': model.param_dtype): 'bfloat16' halves
      # the memory of a frozen base model (LoRA), whose weights the step never updates.
      frozen_dtype=''))
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
      # Grain reader threads (per worker process when num_workers > 0); -1: one per CPU core,
      # at most 16 (panda_jax.data.pipeline.read_options). 16 is Grain's default.
      read_threads=16,
      # Decoded, padded clips kept in memory, MiB per process (0: none; see
      # panda_jax.data.pipeline.VideoCache): for clips that come back within its reach.
      video_cache_mb=0,
      shuffle_seed=0, synthetic_videos=24 if tiny else 0, description=st['data'],
      teacher_features='',
      # Packed ArrayRecord shards (panda_jax.data.packing) instead of annotations + videos:
      # the tfds data_dir and the packed set's config name (e.g. 'valley').
      packed='', packed_config='',
      # The conversation template, by name (panda_jax.data.templates; the field keeps its
      # old name): 'videopanda_v1' ("curious human", the spec's and the reference's inference
      # template), 'vicuna_v1' ("curious user", what the released training scripts used via
      # --version v1), both with a Llama/Vicuna tokenizer; or 'chatml' (SmolLM2-Instruct's,
      # with its own tokenizer). A training workdir's value is what predict / eval.videoqa
      # answer with.
      system_prompt='videopanda_v1'))
  # from_run: an earlier stage's workdir; converted: `panda_jax.convert.checkpoint` output;
  # teacher: a LanguageBind video checkpoint directory (random only for tiny runs).
  c.init = ml_collections.ConfigDict(dict(
      from_run='', converted='', require=[], skip=[], teacher='', teacher_prefix='vision_model.'))
  if 'lora' in options:
    lora_options(c, tiny)
  if named:
    pod_layout(c, **layouts[named[0]])
  return c


# The `lora` option of the stage configs: LLaVA's and Video-LLaVA's LoRA recipe (rank 128,
# alpha 256, dropout 0.05, learning rate 2e-4 with the projector's 2e-5, global batch 128),
# scaled down for tiny. At 7B, batch 128 and the chunked loss (exact) make the stage-3 step fit
# a v5e-8 slice: 14.76 GiB per chip by the TPU compiler (17.53 GiB at batch 1024 without the
# chunked loss; docs/benchmarks.md, "LoRA stage 3: memory").
LORA = {'7b': dict(rank=128, alpha=256.0, dropout=0.05, lr=2e-4, batch_size=128, loss_chunk=512),
        'tiny': dict(rank=4, alpha=8.0, dropout=0.05, lr=2e-3)}


def lora_options(config: ml_collections.ConfigDict, tiny: bool) -> None:
  """Makes an (unlocked) stage config fine-tune the decoder through LoRA factors on every
  attention and MLP projection: the decoder's base weights (embeddings, norms, projections, LM
  head) frozen and kept in bfloat16, the LoRA factors trained at `lr`, and the visual part and
  the distillation head trained as before at a tenth of it (the stage's own rate). At 7B also
  the recipe's global batch and the chunked loss (`LORA`)."""
  spec = LORA['tiny' if tiny else '7b']
  lr = spec['lr']
  if 'batch_size' in spec:
    config.train.batch_size = spec['batch_size']
    config.model.llm.loss_chunk = spec['loss_chunk']
  config.model.lora.rank = spec['rank']
  config.model.lora.alpha = spec['alpha']
  config.model.lora.dropout = spec['dropout']
  config.optim.lr = lr
  config.optim.trainable = ['^visual/', '^distill/', lora_lib.FACTOR_PATTERN]
  config.optim.lr_scale = [['^visual/', 0.1], ['^distill/', 0.1]]
  config.optim.frozen_dtype = 'bfloat16'
