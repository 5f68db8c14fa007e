"""Which parameters train, at what learning rate: regexes over parameter paths, from config.

Parameter paths are '/'-joined tree keys (`llm/layers/attn/q/kernel`,
`visual/stab/lste/down/kernel`, `distill/input_layer/kernel`). The three stages differ only in
these patterns and numbers, never in code.

config.optim fields:
  lr, warmup_ratio, end_lr_ratio: AdamW peak rate, warm-up share of the steps, final rate.
  b1, b2, eps, weight_decay: AdamW. As the Hugging Face Trainer the reference trains with,
    weight decay skips biases and normalisation scales (`decays`); 0 in every released stage.
  clip_norm: global-norm clipping of the trainable gradients (0 = off).
  trainable: regexes; a parameter trains when one matches (`re.search`).
  frozen: regexes that override `trainable`.
  lr_scale: list of [regex, multiplier]; the first match scales that parameter's rate.
  frozen_dtype: the dtype frozen parameters are kept in ('' = the model's param_dtype), e.g.
    'bfloat16' for the frozen base weights of a LoRA run (`cast_frozen`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from panda_jax.tree import flatten, unflatten

FROZEN = 'frozen'


def _compile(patterns, what: str) -> list[re.Pattern]:
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f'optim.{what}: invalid regex {p!r}: {e}') from None
  return out


def param_labels(paths, optim) -> dict[str, str]:
  """path -> 'frozen' or the name of its learning-rate group ('lr_x<multiplier>')."""
  trainable = _compile(optim.trainable, 'trainable')
  frozen = _compile(optim.frozen, 'frozen')
  scales = [(re.compile(p), float(m)) for p, m in optim.lr_scale]
  labels = {}
  for path in paths:
    if not any(r.search(path) for r in trainable) or any(r.search(path) for r in frozen):
      labels[path] = FROZEN
      continue
    mult = next((m for r, m in scales if r.search(path)), 1.0)
    labels[path] = f'lr_x{mult:g}'
  if all(v == FROZEN for v in labels.values()):
    raise ValueError(f'optim.trainable={list(optim.trainable)} (minus optim.frozen) matches no '
                     'parameter; nothing would train')
  return labels


def schedule(optim, total_steps: int, multiplier: float = 1.0):
  """Linear warm-up from 0, then cosine decay to `end_lr_ratio * lr` at `total_steps`."""
  peak = optim.lr * multiplier
  warmup = int(round(optim.warmup_ratio * total_steps))
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=peak * optim.end_lr_ratio)


NO_DECAY = re.compile(r'(^|/)(bias|scale)$')


def decays(path: str) -> bool:
  """Whether AdamW's weight decay applies to the parameter at `path`: not to biases nor to the
  scales of LayerNorm, RMSNorm and BatchNorm (flax names them `bias` and `scale`), as the
  Hugging Face Trainer leaves out biases and its layer-norm classes."""
  return not NO_DECAY.search(path)


def make_optimizer(labels: Mapping[str, str], optim, total_steps: int):
  """AdamW per learning-rate group over the trainable parameters only (a nested tree; `labels`
  maps every flat path to its group or FROZEN).

  Returns (optax transformation, {group: schedule}).
  """
  groups = sorted({v for v in labels.values() if v != FROZEN})
  schedules = {g: schedule(optim, total_steps, float(g[len('lr_x'):])) for g in groups}
  trainable = {k: v for k, v in labels.items() if v != FROZEN}
  # Which trainable parameters decay, by the same flat paths as `labels` (none when it is 0).
  mask = unflatten({k: decays(k) for k in trainable}) if optim.weight_decay else None
  transforms = {
      g: optax.adamw(schedules[g], b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay, mask=mask)
      for g in groups}
  tx = optax.multi_transform(transforms, unflatten(trainable))
  if optim.clip_norm and optim.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
  return tx, schedules


FROZEN_DTYPES = {'': None, 'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def frozen_dtype(optim):
  """`optim.frozen_dtype` as a dtype, or None (frozen parameters keep their dtype)."""
  name = optim.get('frozen_dtype', '') if hasattr(optim, 'get') else ''
  if name not in FROZEN_DTYPES:
    raise ValueError(f'optim.frozen_dtype={name!r}; expected one of {sorted(FROZEN_DTYPES)} '
                     '("" keeps model.param_dtype)')
  return FROZEN_DTYPES[name]


def cast_frozen(params: Mapping, labels: Mapping[str, str], dtype) -> dict:
  """`params` with every frozen floating-point parameter cast to `dtype` (None: unchanged);
  trainable ones keep their (master) dtype. Works on arrays and on `ShapeDtypeStruct`s."""
  if dtype is None:
    return params

  def cast(path, x):
    if labels[path] != FROZEN or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  return unflatten({k: cast(k, v) for k, v in flatten(params).items()})


def state_shardings(tx, opt_shapes, train_shardings, replicated):
  """Shardings of the optimizer state `opt_shapes` (`jax.eval_shape(tx.init, trainable)`):
  each parameter-like leaf as its parameter (`train_shardings`), the rest (counts) replicated.
  With several learning-rate groups (optax.multi_transform) each group's state holds
  MaskedNode where the other groups' parameters are: those stay as they are."""
  return optax.tree_map_params(
      tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s, opt_shapes,
      train_shardings, transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def split(flat: Mapping[str, Any], labels: Mapping[str, str]):
  """-> (trainable flat dict, frozen flat dict)."""
  train = {k: v for k, v in flat.items() if labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
  return train, frozen


def global_norm(tree) -> jnp.ndarray:
  return optax.tree.norm(tree)
