"""LanguageBind video encoder (or Hugging Face CLIP vision) weights -> our `VideoTeacher`.

Names are LanguageBind's `CLIPVisionTransformer` (= `LanguageBindVideo.vision_model`, what
Video-Panda's `LanguageBindVideoTower.video_tower` holds), under a prefix (`vision_model.` in a
`LanguageBind_Video_merge` checkpoint):

  embeddings.class_embedding [C]          embeddings.patch_embedding.weight [C, 3, p, p]
  embeddings.position_embedding.weight [1 + N, C]
  pre_layrnorm.{weight,bias}              post_layernorm.{weight,bias} (unused: dropped)
  encoder.layers.i.temporal_embedding [1, num_frames, C]
  encoder.layers.i.{temporal_attn,self_attn}.{q,k,v,out}_proj.{weight,bias}
  encoder.layers.i.{temporal_layer_norm1,layer_norm1,layer_norm2}.{weight,bias}
  encoder.layers.i.mlp.{fc1,fc2}.{weight,bias}

A Hugging Face `CLIPVisionModel` / `CLIPModel` checkpoint has the same names without the
temporal ones (convert it with `TeacherConfig(temporal=False, activation='quick_gelu')`).
Layers past the selected hidden state and the post-LayerNorm are accepted and not converted,
as is the `position_ids` buffer (`convert_teacher(kept=...)` collects them for
`teacher_to_torch(kept=...)`); names outside the prefix (a text tower, projections) are ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax.convert.common import (NameConsumer, apply_rules, check_shapes, identity,
                                      inverse_permutation, invert_rules, linear, unlinear)
from panda_jax.models.teacher import TeacherConfig, VideoTeacher

DEFAULT_PREFIX = 'vision_model.'


def _ln(torch_prefix: str, path: str):
  return [(torch_prefix + '.weight', path + '/scale', identity, identity),
          (torch_prefix + '.bias', path + '/bias', identity, identity)]


def _flat(x):
  return x.reshape(-1)


def _attention(torch_prefix: str, path: str, h: int, d: int):
  rules = []
  for name in ('q', 'k', 'v'):
    rules += [(f'{torch_prefix}.{name}_proj.weight', f'{path}/{name}/kernel',
               lambda w: linear(w).reshape(w.shape[1], h, d),
               lambda k: unlinear(k.reshape(k.shape[0], -1))),
              (f'{torch_prefix}.{name}_proj.bias', f'{path}/{name}/bias',
               lambda b: b.reshape(h, d), _flat)]
  rules += [(f'{torch_prefix}.out_proj.weight', f'{path}/out/kernel',
             lambda w: linear(w).reshape(h, d, w.shape[0]),
             lambda k: unlinear(k.reshape(-1, k.shape[-1]))),
            (f'{torch_prefix}.out_proj.bias', f'{path}/out/bias', identity, identity)]
  return rules


def _dense(torch_prefix: str, path: str):
  return [(torch_prefix + '.weight', path + '/kernel', linear, unlinear),
          (torch_prefix + '.bias', path + '/bias', identity, identity)]


PATCH_AXES = (2, 3, 1, 0)


def teacher_rules(cfg: TeacherConfig, prefix: str = DEFAULT_PREFIX) -> list:
  """(torch name, our path, transform, inverse) for the layers up to `cfg.run_layers`."""
  h, d = cfg.heads, cfg.head_dim
  e = prefix + 'embeddings.'
  rules = [
      (e + 'patch_embedding.weight', 'patch_embed/kernel', lambda w: w.transpose(PATCH_AXES),
       lambda k: k.transpose(inverse_permutation(PATCH_AXES))),
      (e + 'class_embedding', 'class_embed', identity, identity),
      (e + 'position_embedding.weight', 'pos_embed', identity, identity),
      *_ln(prefix + 'pre_layrnorm', 'pre_norm'),
  ]
  for i in range(cfg.run_layers):
    t = f'{prefix}encoder.layers.{i}.'
    o = f'layers_{i}/'
    if cfg.temporal:
      rules += [(t + 'temporal_embedding', o + 'temporal_embed',
                 lambda w: w.reshape(w.shape[-2], w.shape[-1]), lambda x: x[None]),
                *_ln(t + 'temporal_layer_norm1', o + 'temporal_norm'),
                *_attention(t + 'temporal_attn', o + 'temporal_attn', h, d)]
    rules += [*_ln(t + 'layer_norm1', o + 'norm1'),
              *_attention(t + 'self_attn', o + 'attn', h, d),
              *_ln(t + 'layer_norm2', o + 'norm2'),
              *_dense(t + 'mlp.fc1', o + 'fc1'),
              *_dense(t + 'mlp.fc2', o + 'fc2')]
  return rules


def _dropped(cfg: TeacherConfig, prefix: str) -> tuple[str, ...]:
  """Names accepted and not converted: layers after the selected state, post-LN, buffers."""
  out = [prefix + 'post_layernorm.', prefix + 'embeddings.position_ids']
  out += [f'{prefix}encoder.layers.{i}.' for i in range(cfg.run_layers, cfg.layers)]
  return tuple(out)


def convert_teacher(state: Mapping[str, Any], cfg: TeacherConfig,
                    prefix: str = DEFAULT_PREFIX, *, kept: dict | None = None) -> dict[str, Any]:
  """-> {'params': ...} for `VideoTeacher(cfg)` (numpy).

  Args:
    state: PyTorch name -> array.
    cfg: the teacher's sizes; layers up to `cfg.run_layers` are converted.
    prefix: what precedes `embeddings.` / `encoder.` in the names (`vision_model.`,
      `model.video_teacher.`, or '' for a bare tower).
    kept: when given, receives the tensors under `prefix` accepted and not converted (the
      post-LayerNorm, layers past the selected one, `position_ids`), as read.
  Raises:
    ConversionError naming every missing or unexpected tensor under `prefix`, then (names
    fine) every tensor whose shape disagrees with the config.
  """
  cfg.validate()
  src = NameConsumer(state, [prefix], dropped=_dropped(cfg, prefix))
  params = apply_rules(src, teacher_rules(cfg, prefix))
  has_temporal = any(n.startswith(prefix) and '.temporal_' in n for n in state)
  if has_temporal and not cfg.temporal:
    src.problem('the checkpoint has temporal layers (LanguageBind video): use '
                'TeacherConfig(temporal=True)')
  if cfg.temporal and not has_temporal:
    src.problem('the checkpoint has no temporal layers (a plain CLIP ViT): use '
                'TeacherConfig(temporal=False)')
  src.finish('teacher')
  check_shapes(params, abstract_params(cfg), 'teacher')
  if kept is not None:
    kept.update(src.kept())
  return {'params': params}


def teacher_to_torch(params: Mapping[str, Any], cfg: TeacherConfig,
                     prefix: str = DEFAULT_PREFIX, *,
                     kept: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """The inverse of `convert_teacher`: our `params` -> PyTorch names under `prefix`, plus the
  `position_ids` buffer (0 .. positions - 1) and the tensors `convert_teacher(kept=...)`
  collected (`kept`, as they are). Without `kept`, the post-LayerNorm and the layers past
  `cfg.run_layers`, which the converter does not convert, have no source and are not written."""
  out = invert_rules(teacher_rules(cfg, prefix), params)
  positions = out[prefix + 'embeddings.position_embedding.weight'].shape[0]
  out[prefix + 'embeddings.position_ids'] = np.arange(positions, dtype=np.int64)[None]
  out.update(kept or {})
  return out


def abstract_params(cfg: TeacherConfig):
  """The model's parameter shapes (no computation), for checking a conversion."""
  frames = jax.ShapeDtypeStruct((1, cfg.num_frames if cfg.temporal else 1, cfg.image_size,
                                 cfg.image_size, 3), jnp.float32)
  return jax.eval_shape(VideoTeacher(cfg).init, jax.random.PRNGKey(0), frames)['params']

