"""Released Video-Panda visual weights (PyTorch names) -> our STAB, projector and distillation head.

Names follow `shared/golden/stab_state_dict_keys.txt`:
`model.video_tower.*` (STAB), `model.video_projector.*` (mlp2x_gelu) and
`model.video_tower_compressor.*` (distillation head). The unused `lmhra2` module, BatchNorm's
`num_batches_tracked` and the image-path aliases `model.vision_tower.*` / `model.mm_projector.*`
are accepted and dropped.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from panda_jax.convert.common import NameConsumer, apply_rules, identity, linear
from panda_jax.models.distill import DistillConfig
from panda_jax.models.stab import StabConfig

TOWER = 'model.video_tower.'
PROJECTOR = 'model.video_projector.'
COMPRESSOR = 'model.video_tower_compressor.'
ALIASES = ('model.vision_tower.', 'model.mm_projector.')
DROPPED = (TOWER + 'lmhra2.', TOWER + 'lmhra1.pos_embed.0.num_batches_tracked') + ALIASES


def _ln(torch_prefix: str, path: str):
  return [(torch_prefix + '.weight', path + '/scale', identity),
          (torch_prefix + '.bias', path + '/bias', identity)]


def _dense(torch_prefix: str, path: str, bias: bool = True, out_shape=None, in_shape=None):
  """Linear [out, in] -> kernel [*in_shape, *out_shape] (+ bias [*out_shape])."""

  def k(w):
    w = linear(w)  # [in, out]
    shape = tuple(in_shape or (w.shape[0],)) + tuple(out_shape or (w.shape[1],))
    return w.reshape(shape)

  rules = [(torch_prefix + '.weight', path + '/kernel', k)]
  if bias:
    rules.append((torch_prefix + '.bias', path + '/bias',
                  lambda b: b.reshape(tuple(out_shape or b.shape))))
  return rules


def _heads_kernel(rows: slice, h: int, d: int):
  """Rows of a packed [3C or 2C, C] projection -> [C, heads, head_dim]."""
  return lambda w: w[rows].T.reshape(w.shape[1], h, d)


def _single_query_rules(src: NameConsumer, name: str, path: str, c: int, h: int):
  d = c // h
  p = TOWER + name
  return (_ln(p + '.q.0', path + '/q_norm') +
          [(p + '.q.1.weight', path + '/q/kernel', lambda w: w.T.reshape(c, h, d))] +
          _ln(p + '.kv.0', path + '/kv_norm') +
          [(p + '.kv.1.weight', path + '/k_kernel', lambda w: w[:c].reshape(h, d, c)),
           (p + '.kv.1.weight', path + '/v_kernel', lambda w: w[c:].reshape(h, d, c))] +
          _dense(p + '.proj', path + '/out', in_shape=(h, d)))


def stab_rules(src: NameConsumer, cfg: StabConfig) -> list:
  c, h = cfg.hidden, cfg.heads
  d = c // h
  t = TOWER
  s = 'params/stab/'
  g = s + 'gstra/'
  rules = [
      (t + 'patch_embedding.weight', s + 'patch_embed/kernel',
       lambda w: w.transpose(2, 3, 1, 0)),
      # LSTE: lmhra1 (BN, 1x1x1, depthwise temporal, 1x1x1) and dpe.
      (t + 'lmhra1.pos_embed.0.weight', s + 'lste/bn/scale', identity),
      (t + 'lmhra1.pos_embed.0.bias', s + 'lste/bn/bias', identity),
      (t + 'lmhra1.pos_embed.0.running_mean', 'batch_stats/stab/lste/bn/mean', identity),
      (t + 'lmhra1.pos_embed.0.running_var', 'batch_stats/stab/lste/bn/var', identity),
      *_dense(t + 'lmhra1.pos_embed.1', s + 'lste/down'),
      (t + 'lmhra1.pos_embed.2.weight', s + 'lste/temporal_kernel',
       lambda w: w.reshape(w.shape[0], 3).T),
      (t + 'lmhra1.pos_embed.2.bias', s + 'lste/temporal_bias', identity),
      *_dense(t + 'lmhra1.pos_embed.3', s + 'lste/up'),
      (t + 'dpe.weight', s + 'lste/dpe_kernel', lambda w: w.transpose(2, 3, 4, 1, 0)),
      (t + 'dpe.bias', s + 'lste/dpe_bias', identity),
      # GSTRA.
      (t + 'temporal_cls_token', g + 'query', lambda w: w.reshape(-1)),
      *_ln(t + 'dec.ln_1', g + 'ln_1'),
      *_ln(t + 'dec.ln_2', g + 'ln_2'),
      *_ln(t + 'dec.ln_3', g + 'ln_3'),
      (t + 'dec.attn.in_proj_weight', g + 'q/kernel', _heads_kernel(slice(0, c), h, d)),
      (t + 'dec.attn.in_proj_bias', g + 'q/bias', lambda b: b[:c].reshape(h, d)),
      (t + 'dec.attn.in_proj_weight', g + 'k_kernel', _heads_kernel(slice(c, 2 * c), h, d)),
      (t + 'dec.attn.in_proj_bias', g + 'k_bias', lambda b: b[c:2 * c].reshape(h, d)),
      (t + 'dec.attn.in_proj_weight', g + 'v_kernel', _heads_kernel(slice(2 * c, 3 * c), h, d)),
      (t + 'dec.attn.in_proj_bias', g + 'v_bias', lambda b: b[2 * c:].reshape(h, d)),
      *_dense(t + 'dec.attn.out_proj', g + 'out', in_shape=(h, d)),
      *_dense(t + 'dec.mlp.c_fc', g + 'fc'),
      *_dense(t + 'dec.mlp.c_proj', g + 'proj'),
      # LSD, FSRA, fusion, <row>.
      *_single_query_rules(src, 'local_attention', s + 'lsd', c, h),
      *_single_query_rules(src, 'global_attention', s + 'fsra', c, h),
      (t + 'class_embedding', s + 'fsra_query', identity),
      (t + 'balance', s + 'balance', identity),
      *_ln(t + 'proj.0', s + 'fusion_norm'),
      *_dense(t + 'proj.2', s + 'fusion_proj'),
      (t + 'split_embedding', s + 'row_token', identity),
      # Projector (mlp2x_gelu: Linear, GELU, Linear).
      *_dense(PROJECTOR + '0', 'params/projector/fc1'),
      *_dense(PROJECTOR + '2', 'params/projector/fc2'),
  ]
  return rules


def distill_rules(src: NameConsumer, cfg: DistillConfig) -> list:
  p = COMPRESSOR
  k = len(cfg.layers)
  rules = []
  for name, out, fn in (('0.weight', 'norm_scale', identity), ('0.bias', 'norm_bias', identity),
                        ('1.weight', 'proj_kernel', lambda w: w.T)):
    names = [f'{p}norm_layer.{j}.{name}' for j in range(k)]
    arrays = [src.take(n) for n in names]
    if all(a is not None for a in arrays):
      rules.append((names, out, fn, arrays))
  flat = {}
  for names, out, fn, arrays in rules:
    flat[out] = np.stack([fn(a) for a in arrays])
  extra = [n for n in src.state if n.startswith(p + 'norm_layer.')
           and int(n[len(p + 'norm_layer.'):].split('.')[0]) >= k]
  if extra:
    src.problem(f'the checkpoint has {len(extra)} norm_layer entries beyond the {k} '
                f'distillation layers {list(cfg.layers)} (first: {extra[0]}): wrong layer list?')
    for n in extra:
      src.drop(n)
  tree = apply_rules(src, _dense(p + 'input_layer', 'input_layer') +
                     _dense(p + 'output_layer', 'output_layer'))
  tree.update(flat)
  return tree


def convert_visual(state: Mapping[str, Any], stab: StabConfig | None,
                   distill: DistillConfig | None = None, *,
                   ignore_other: bool = False) -> dict[str, Any]:
  """Converts the visual part of a released checkpoint.

  Args:
    state: PyTorch name -> array (numpy or torch-converted).
    stab: convert the STAB + projector when given.
    distill: convert the distillation head when given.
    ignore_other: leave names outside the visual prefixes (the LLM) alone; otherwise they are
      reported as unexpected.
  Returns:
    {'visual': {'params': ..., 'batch_stats': ...}, 'distill': {'params': ...}} for the parts
    asked for.
  Raises:
    ConversionError naming every missing, unexpected and misshaped tensor.
  """
  prefixes = [] if ignore_other else ['']
  if stab is not None:
    prefixes += [TOWER, PROJECTOR]
  if distill is not None:
    prefixes += [COMPRESSOR]
  src = NameConsumer(state, prefixes, dropped=DROPPED)
  out: dict[str, Any] = {}
  if stab is not None:
    out['visual'] = apply_rules(src, stab_rules(src, stab))
  if distill is not None:
    out['distill'] = {'params': distill_rules(src, distill)}
  src.finish('visual')
  return out
