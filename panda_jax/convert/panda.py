"""The authors' full Video-Panda-7B checkpoint -> our `VideoPanda` variables.

The released layout is a Hugging Face Llama checkpoint plus `model.video_tower.*`,
`model.video_projector.*` and `model.video_tower_compressor.*` (and the image-path aliases).
Tensors stream in shard by shard: decoder tensors go straight into their stacked places, the
small visual part (about 50M values) is collected and converted at the end.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from panda_jax.convert.common import ConversionError
from panda_jax.convert.llama import LlamaBuilder, config_from_hf
from panda_jax.convert.visual import ALIASES, COMPRESSOR, PROJECTOR, TOWER, convert_visual
from panda_jax.models.distill import DistillConfig, default_layers
from panda_jax.models.panda import PandaConfig
from panda_jax.models.stab import StabConfig

# The frozen teacher's weights, when a checkpoint carries them, are the teacher converter's.
TEACHER = 'model.video_teacher.'
VISUAL = (TOWER, PROJECTOR, COMPRESSOR) + ALIASES


def panda_config_from_hf(hf: Mapping, stab: StabConfig | None = None,
                         teacher_hidden: int = 1024, distill_heads: int = 8) -> PandaConfig:
  """PandaConfig from the checkpoint's config.json; STAB sizes default to the released ones."""
  llm = config_from_hf(hf)
  stab = stab or StabConfig()
  import dataclasses
  stab = dataclasses.replace(stab, llm_hidden=llm.hidden)
  distill = DistillConfig(llm_hidden=llm.hidden, teacher_hidden=teacher_hidden,
                          heads=distill_heads, layers=default_layers(llm.layers))
  cfg = PandaConfig(stab=stab, llm=llm, distill=distill)
  cfg.validate()
  return cfg


def convert_panda(tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                  cfg: PandaConfig, *, llm_dtype=None, tie_embeddings: bool = False,
                  kept: dict | None = None) -> dict:
  """-> {'params': {'visual', 'llm', 'distill'}, 'batch_stats': {'visual'}} (numpy).

  `llm_dtype` (e.g. `ml_dtypes.bfloat16`) stores the decoder in that dtype while converting,
  which keeps a 7B conversion within host memory. `tie_embeddings`: the head is the embedding
  (a checkpoint without `lm_head.weight`, config.json's tie_word_embeddings). Raises
  ConversionError naming every missing, unexpected or misshaped tensor. `kept`, when given,
  receives every tensor accepted and not converted (the teacher's, the unused `lmhra2` module,
  `num_batches_tracked`, the image-path aliases, the RoPE buffers), as read: what
  `panda_jax.convert.export` writes back.
  """
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  llm = LlamaBuilder(cfg.llm, dtype=llm_dtype, tie_embeddings=tie_embeddings, kept=kept)
  visual: dict[str, np.ndarray] = {}
  unexpected = []
  for name, w in items:
    if name.startswith(VISUAL):
      visual[name] = np.asarray(w)
    elif name.startswith(TEACHER):
      if kept is not None:
        kept[name] = np.asarray(w)
    elif not llm.add(name, w):
      unexpected.append(name)
  problems = []
  try:
    llm_params = llm.finish()
  except ConversionError as e:
    problems.append(str(e))
  # Without distillation (distill.loss='none', an ablation) the model has no head.
  head = cfg.distill if cfg.distill.loss != 'none' else None
  try:
    vis = convert_visual(visual, cfg.stab, head, kept=kept)
  except ConversionError as e:
    problems.append(str(e))
  if unexpected:
    problems.append(f'unexpected ({len(unexpected)}): ' + ', '.join(sorted(unexpected)))
  if problems:
    raise ConversionError('cannot convert the Video-Panda checkpoint:\n' + '\n'.join(problems))
  params = {'visual': vis['visual']['params'], 'llm': llm_params}
  if head is not None:
    params['distill'] = vis['distill']['params']
  return {'params': params, 'batch_stats': {'visual': vis['visual']['batch_stats']}}
