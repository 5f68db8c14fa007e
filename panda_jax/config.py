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
from panda_jax.models.stab import StabConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Model sizes by name. '7b' is the released Video-Panda-7B; 'tiny' is for CPU tests and demos.
MODEL_SIZES = {
    '7b': dict(stab=dict(), llm=dict(hidden=4096, layers=32)),
    'tiny': dict(stab=dict(hidden=64, heads=4, image_size=112, empty_frame_patches=4),
                 llm=dict(hidden=128, layers=4)),
}


def model_config(size: str = '7b') -> ml_collections.ConfigDict:
  """The model section of a config for a named size."""
  if size not in MODEL_SIZES:
    raise ValueError(f'model size {size!r}; expected one of {sorted(MODEL_SIZES)}')
  spec = MODEL_SIZES[size]
  llm = spec['llm']
  stab = dataclasses.asdict(StabConfig(llm_hidden=llm['hidden'], **spec['stab']))
  distill = dict(teacher_hidden=1024 if size == '7b' else 32, heads=8,
                 layers=list(default_layers(llm['layers'])))
  return ml_collections.ConfigDict(dict(
      size=size, stab=stab, distill=distill, llm_hidden=llm['hidden'],
      llm_layers=llm['layers'], dtype='float32', param_dtype='float32'))


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
                      heads=model.distill.heads, layers=tuple(model.distill.layers))
  cfg.validate(model.llm_layers)
  return cfg


def save_resolved(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config to `workdir/config.json` and returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w') as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  return path
