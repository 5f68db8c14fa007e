"""Released Video-Panda visual weights (PyTorch names) -> our STAB, projector and distillation head.

Names follow `shared/golden/stab_state_dict_keys.txt`:
`model.video_tower.*` (STAB), `model.video_projector.*` (mlp2x_gelu) and
`model.video_tower_compressor.*` (distillation head). The unused `lmhra2` module, BatchNorm's
`num_batches_tracked` and the image-path aliases `model.vision_tower.*` / `model.mm_projector.*`
are accepted and not converted (`convert_visual(kept=...)` collects them, as read, and
`visual_to_torch(kept=...)` writes them back).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from panda_jax.convert.common import (NameConsumer, apply_rules, identity, inverse_permutation,
                                      invert_rules, linear, unlinear)
from panda_jax.models.distill import DistillConfig
from panda_jax.models.stab import StabConfig

TOWER = 'model.video_tower.'
PROJECTOR = 'model.video_projector.'
COMPRESSOR = 'model.video_tower_compressor.'
ALIASES = ('model.vision_tower.', 'model.mm_projector.')
DROPPED = (TOWER + 'lmhra2.', TOWER + 'lmhra1.pos_embed.0.num_batches_tracked') + ALIASES


def _ln(torch_prefix: str, path: str):
  return [(torch_prefix + '.weight', path + '/scale', identity, identity),
          (torch_prefix + '.bias', path + '/bias', identity, identity)]


def _flat(x: np.ndarray) -> np.ndarray:
  return x.reshape(-1)


def _dense(torch_prefix: str, path: str, bias: bool = True, out_shape=None, in_shape=None,
           torch_tail: tuple[int, ...] = ()):
  """Linear [out, in] (or a 1x1x1 convolution [out, in, *torch_tail]) -> kernel
  [*in_shape, *out_shape] (+ bias [*out_shape])."""

  def k(w):
    w = linear(w)  # [in, out]
    shape = tuple(in_shape or (w.shape[0],)) + tuple(out_shape or (w.shape[1],))
    return w.reshape(shape)

  def k_inv(kernel):
    n_in = int(np.prod(in_shape)) if in_shape else kernel.shape[0]
    return unlinear(kernel.reshape(n_in, -1), torch_tail)

  rules = [(torch_prefix + '.weight', path + '/kernel', k, k_inv)]
  if bias:
    rules.append((torch_prefix + '.bias', path + '/bias',
                  lambda b: b.reshape(tuple(out_shape or b.shape)), _flat))
  return rules


def _heads_kernel(rows: slice, h: int, d: int):
  """Rows of a packed [3C or 2C, C] projection -> [C, heads, head_dim]."""
  return lambda w: w[rows].T.reshape(w.shape[1], h, d)


def _heads_kernel_inv(k: np.ndarray) -> np.ndarray:
  """[C, heads, head_dim] -> its rows [heads * head_dim, C] of the packed projection."""
  return k.reshape(k.shape[0], -1).T


def _single_query_rules(src: NameConsumer, name: str, path: str, c: int, h: int):
  d = c // h
  p = TOWER + name
  rows = lambda k: k.reshape(-1, c)   # [h, d, C] -> rows [h * d, C] of kv.1
  return (_ln(p + '.q.0', path + '/q_norm') +
          [(p + '.q.1.weight', path + '/q/kernel', lambda w: w.T.reshape(c, h, d),
            _heads_kernel_inv)] +
          _ln(p + '.kv.0', path + '/kv_norm') +
          [(p + '.kv.1.weight', path + '/k_kernel', lambda w: w[:c].reshape(h, d, c), rows),
           (p + '.kv.1.weight', path + '/v_kernel', lambda w: w[c:].reshape(h, d, c), rows)] +
          _dense(p + '.proj', path + '/out', in_shape=(h, d)))


PATCH_AXES = (2, 3, 1, 0)          # Conv2d [C, 3, p, p] -> [p, p, 3, C]
DPE_AXES = (2, 3, 4, 1, 0)         # Conv3d [C, 1, 3, 3, 3] -> [3, 3, 3, 1, C]


def stab_rules(src: NameConsumer | None, cfg: StabConfig) -> list:
  """The STAB's and projector's (torch name, our path, transform, inverse) rules."""
  c, h = cfg.hidden, cfg.heads
  d = c // h
  t = TOWER
  s = 'params/stab/'
  g = s + 'gstra/'
  rules = [
      (t + 'patch_embedding.weight', s + 'patch_embed/kernel',
       lambda w: w.transpose(PATCH_AXES), lambda k: k.transpose(inverse_permutation(PATCH_AXES))),
      # LSTE: lmhra1 (BN, 1x1x1, depthwise temporal, 1x1x1) and dpe.
      (t + 'lmhra1.pos_embed.0.weight', s + 'lste/bn/scale', identity, identity),
      (t + 'lmhra1.pos_embed.0.bias', s + 'lste/bn/bias', identity, identity),
      (t + 'lmhra1.pos_embed.0.running_mean', 'batch_stats/stab/lste/bn/mean', identity,
       identity),
      (t + 'lmhra1.pos_embed.0.running_var', 'batch_stats/stab/lste/bn/var', identity, identity),
      *_dense(t + 'lmhra1.pos_embed.1', s + 'lste/down', torch_tail=(1, 1, 1)),
      (t + 'lmhra1.pos_embed.2.weight', s + 'lste/temporal_kernel',
       lambda w: w.reshape(w.shape[0], 3).T, lambda k: k.T.reshape(k.shape[1], 1, 3, 1, 1)),
      (t + 'lmhra1.pos_embed.2.bias', s + 'lste/temporal_bias', identity, identity),
      *_dense(t + 'lmhra1.pos_embed.3', s + 'lste/up', torch_tail=(1, 1, 1)),
      (t + 'dpe.weight', s + 'lste/dpe_kernel', lambda w: w.transpose(DPE_AXES),
       lambda k: k.transpose(inverse_permutation(DPE_AXES))),
      (t + 'dpe.bias', s + 'lste/dpe_bias', identity, identity),
      # GSTRA.
      (t + 'temporal_cls_token', g + 'query', _flat, lambda q: q.reshape(1, 1, -1)),
      *_ln(t + 'dec.ln_1', g + 'ln_1'),
      *_ln(t + 'dec.ln_2', g + 'ln_2'),
      *_ln(t + 'dec.ln_3', g + 'ln_3'),
      (t + 'dec.attn.in_proj_weight', g + 'q/kernel', _heads_kernel(slice(0, c), h, d),
       _heads_kernel_inv),
      (t + 'dec.attn.in_proj_bias', g + 'q/bias', lambda b: b[:c].reshape(h, d), _flat),
      (t + 'dec.attn.in_proj_weight', g + 'k_kernel', _heads_kernel(slice(c, 2 * c), h, d),
       _heads_kernel_inv),
      (t + 'dec.attn.in_proj_bias', g + 'k_bias', lambda b: b[c:2 * c].reshape(h, d), _flat),
      (t + 'dec.attn.in_proj_weight', g + 'v_kernel', _heads_kernel(slice(2 * c, 3 * c), h, d),
       _heads_kernel_inv),
      (t + 'dec.attn.in_proj_bias', g + 'v_bias', lambda b: b[2 * c:].reshape(h, d), _flat),
      *_dense(t + 'dec.attn.out_proj', g + 'out', in_shape=(h, d)),
      *_dense(t + 'dec.mlp.c_fc', g + 'fc'),
      *_dense(t + 'dec.mlp.c_proj', g + 'proj'),
      # LSD, FSRA, fusion, <row>.
      *_single_query_rules(src, 'local_attention', s + 'lsd', c, h),
      *_single_query_rules(src, 'global_attention', s + 'fsra', c, h),
      (t + 'class_embedding', s + 'fsra_query', identity, identity),
      (t + 'balance', s + 'balance', identity, identity),
      *_ln(t + 'proj.0', s + 'fusion_norm'),
      *_dense(t + 'proj.2', s + 'fusion_proj'),
      (t + 'split_embedding', s + 'row_token', identity, identity),
      # Projector (mlp2x_gelu: Linear, GELU, Linear).
      *_dense(PROJECTOR + '0', 'params/projector/fc1'),
      *_dense(PROJECTOR + '2', 'params/projector/fc2'),
  ]
  return rules


# The head's per-layer LayerNorm + projection, `norm_layer.<j>.<name>`, stacked over layers
# into our [K, ...] arrays: (name, our variable, transform, inverse).
NORM_PARTS = (('0.weight', 'norm_scale', identity, identity),
              ('0.bias', 'norm_bias', identity, identity),
              ('1.weight', 'proj_kernel', lambda w: w.T, lambda k: k.T))


def _distill_dense(p: str) -> list:
  return _dense(p + 'input_layer', 'input_layer') + _dense(p + 'output_layer', 'output_layer')


def distill_rules(src: NameConsumer, cfg: DistillConfig) -> list:
  p = COMPRESSOR
  k = len(cfg.layers)
  rules = []
  for name, out, fn, _ in NORM_PARTS:
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
  tree = apply_rules(src, _distill_dense(p))
  tree.update(flat)
  return tree


# Names of the release our model has no counterpart for, written by the exporter so that a
# strict load finds every name (the converted checkpoint's originals when it kept them): BatchNorm's step counter (PyTorch reads it only when the
# momentum is None; the STAB's is 0.1) and the second LMHRA, which the authors' forward never
# calls (PyTorch's initial BatchNorm state, zero convolutions).
def unused_tensors(cfg: StabConfig) -> dict[str, np.ndarray]:
  c, r = cfg.hidden, cfg.lste_hidden
  out = {TOWER + 'lmhra1.pos_embed.0.num_batches_tracked': np.zeros((), np.int64)}
  q = TOWER + 'lmhra2.pos_embed.'
  out.update({
      q + '0.weight': np.ones(c, np.float32), q + '0.bias': np.zeros(c, np.float32),
      q + '0.running_mean': np.zeros(c, np.float32), q + '0.running_var': np.ones(c, np.float32),
      q + '0.num_batches_tracked': np.zeros((), np.int64),
      q + '1.weight': np.zeros((r, c, 1, 1, 1), np.float32), q + '1.bias': np.zeros(r, np.float32),
      q + '2.weight': np.zeros((r, 1, 3, 1, 1), np.float32), q + '2.bias': np.zeros(r, np.float32),
      q + '3.weight': np.zeros((c, r, 1, 1, 1), np.float32), q + '3.bias': np.zeros(c, np.float32),
  })
  return out


def visual_to_torch(visual: Mapping[str, Any] | None, distill: Mapping[str, Any] | None,
                    stab: StabConfig | None, distill_cfg: DistillConfig | None = None, *,
                    unused: bool = True, kept: Mapping[str, Any] | None = None
                    ) -> dict[str, np.ndarray]:
  """The inverse of `convert_visual`: released PyTorch names -> arrays.

  Args:
    visual: {'params': {'stab', 'projector'}, 'batch_stats': {'stab'}} (with `stab`).
    distill: the distillation head's params (with `distill_cfg`).
    unused: also write `unused_tensors(stab)` (the names the converter drops).
    kept: the tensors `convert_visual(kept=...)` collected, written as they are (in place of
      `unused_tensors`' initial values).
  """
  out: dict[str, np.ndarray] = {}
  if stab is not None:
    out.update(invert_rules(stab_rules(None, stab), visual))
    if unused:
      out.update(unused_tensors(stab))
  if distill_cfg is not None:
    out.update(invert_rules(_distill_dense(COMPRESSOR), distill))
    k = len(distill_cfg.layers)
    for name, ours, _, inv in NORM_PARTS:
      stacked = np.asarray(distill[ours])
      if stacked.shape[0] != k:
        raise ValueError(f'distill/{ours} stacks {stacked.shape[0]} layers; the config has {k}')
      for j in range(k):
        out[f'{COMPRESSOR}norm_layer.{j}.{name}'] = inv(stacked[j])
  out.update(kept or {})
  return out


def convert_visual(state: Mapping[str, Any], stab: StabConfig | None,
                   distill: DistillConfig | None = None, *,
                   ignore_other: bool = False, kept: dict | None = None) -> dict[str, Any]:
  """Converts the visual part of a released checkpoint.

  Args:
    state: PyTorch name -> array (numpy or torch-converted).
    stab: convert the STAB + projector when given.
    distill: convert the distillation head when given.
    ignore_other: leave names outside the visual prefixes (the LLM) alone; otherwise they are
      reported as unexpected.
    kept: when given, receives the tensors accepted and not converted (the `lmhra2` module,
      `num_batches_tracked`, the image-path aliases), name -> array with its dtype and bytes.
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
  if kept is not None:
    kept.update(src.kept())
  return out
