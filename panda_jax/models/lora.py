"""LoRA for the decoder's projections: y = x W + (alpha / rank) * dropout(x) A B.

A [in..., r] starts random and B [r, out...] at zero, so at initialisation a model with LoRA
computes exactly what its base model computes. The factors live beside the kernel they adapt
(`llm/layers/attn/q/lora_a`, `.../lora_b`); which projections get them is chosen by regexes
over those kernels' parameter paths (`LoraConfig.targets`). `merge` folds trained factors into
the kernels (W + scale * A B) and drops them, giving the base model's parameter tree.

Shapes: a kernel is `[*in, *out]` (the layout of `layers.Dense`); under the scanned decoder
every parameter has a leading `layers` axis, which `merge` keeps.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

# The decoder's projections that may take LoRA, as parameter paths of their kernels in the
# Video-Panda tree (the paths `optim.trainable` matches). The LM head and embeddings never do.
PROJECTIONS = {
    'attn/q': 'llm/layers/attn/q/kernel', 'attn/k': 'llm/layers/attn/k/kernel',
    'attn/v': 'llm/layers/attn/v/kernel', 'attn/o': 'llm/layers/attn/o/kernel',
    'mlp/gate': 'llm/layers/mlp/gate/kernel', 'mlp/up': 'llm/layers/mlp/up/kernel',
    'mlp/down': 'llm/layers/mlp/down/kernel',
}

# The factors' parameter paths (for `optim.trainable`).
FACTOR_PATTERN = r'/lora_[ab]$'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA of the decoder (`config.model.lora`); rank 0 = off (no parameter added)."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0            # on the LoRA branch's input, in training only
  # Regexes (re.search) over the kernels' paths of PROJECTIONS; default: every attention and
  # MLP projection.
  targets: tuple[str, ...] = (r'/attn/(q|k|v|o)/', r'/mlp/(gate|up|down)/')

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def validate(self) -> None:
    if self.rank < 0:
      raise ValueError(f'model.lora.rank={self.rank} must be >= 0 (0 = no LoRA)')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'model.lora.dropout={self.dropout} must be in [0, 1)')
    if self.enabled:
      if self.alpha <= 0:
        raise ValueError(f'model.lora.alpha={self.alpha} must be > 0')
      for p in self.targets:
        try:
          re.compile(p)
        except re.error as e:
          raise ValueError(f'model.lora.targets: invalid regex {p!r}: {e}') from None
      if not self.targeted():
        raise ValueError(f'model.lora.targets={list(self.targets)} match none of the decoder '
                         f'projections {sorted(PROJECTIONS.values())}')

  def targeted(self) -> frozenset[str]:
    """The projections (keys of PROJECTIONS) that take LoRA."""
    if not self.enabled:
      return frozenset()
    return frozenset(name for name, path in PROJECTIONS.items()
                     if any(re.search(p, path) for p in self.targets))

  def for_projection(self, name: str) -> 'LoraConfig | None':
    """This config where projection `name` (e.g. 'attn/q') is targeted, else None."""
    return self if name in self.targeted() else None


def from_dict(d: Mapping[str, Any] | None) -> LoraConfig:
  """`config.model.lora` (as a dict; None or absent in configs written before LoRA: off)."""
  if not d:
    return LoraConfig()
  d = dict(d)
  if d.get('targets') is not None:
    d['targets'] = tuple(d['targets'])
  cfg = LoraConfig(**d)
  cfg.validate()
  return cfg


def lora_delta(module: nn.Module, cfg: LoraConfig, x: jax.Array, in_shape, out_shape,
               in_axes, out_axes, dtype, param_dtype, dropout_rng: jax.Array | None):
  """The LoRA branch of a projection, created inside `module`'s compact call: x [..., *in] ->
  scale * dropout(x) A B [..., *out] in `dtype`. `dropout_rng` None: no dropout."""
  n_in = len(in_shape)
  fan_in = 1
  for s in in_shape:
    fan_in *= s
  init_a = lambda key, shape, dt: (jax.random.normal(key, shape, dt) * fan_in ** -0.5)
  a = module.param('lora_a', nn.with_logical_partitioning(init_a, tuple(in_axes) + ('lora_rank',)),
                   tuple(in_shape) + (cfg.rank,), param_dtype)
  b = module.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros,
                                                          ('lora_rank',) + tuple(out_axes)),
                   (cfg.rank,) + tuple(out_shape), param_dtype)
  if dropout_rng is not None and cfg.dropout > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - cfg.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - cfg.dropout), 0).astype(x.dtype)
  contract = tuple(range(x.ndim - n_in, x.ndim))
  h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype),
                          ((contract, tuple(range(n_in))), ((), ())))
  y = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
  return (y * cfg.scale).astype(dtype)


def merge(params: Mapping, cfg: LoraConfig) -> dict:
  """merge(params, lora_cfg) -> params without LoRA factors.

  Every module holding `kernel`, `lora_a` and `lora_b` gets `kernel + cfg.scale * A @ B`
  (computed in float32, stored in the kernel's dtype) and loses its factors; the rest of the
  tree is returned as it is. Works on any tree (a whole Video-Panda `params`, or the decoder's
  alone; scanned layers with their leading axis, or unstacked ones). The result is the base
  model's parameter tree (`model.lora.rank=0`). Stable: panda_jax.convert.export calls it.
  """
  if not isinstance(params, Mapping):
    return params
  out = {k: merge(v, cfg) for k, v in params.items() if k not in ('lora_a', 'lora_b')}
  if 'lora_a' in params or 'lora_b' in params:
    if not ('lora_a' in params and 'lora_b' in params and 'kernel' in params):
      raise ValueError(f'a LoRA module holds {sorted(params)}; expected kernel, lora_a and '
                       'lora_b together')
    if not cfg.enabled:
      raise ValueError('the parameters hold LoRA factors but the LoRA config has rank 0; pass '
                       'the config the run trained with (config.json: model.lora)')
    out['kernel'] = merged_kernel(params['kernel'], params['lora_a'], params['lora_b'],
                                  cfg.scale)
  return out


def merged_kernel(kernel, a, b, scale: float):
  """kernel [*lead, *in, *out] + scale * a [*lead, *in, r] @ b [*lead, r, *out]."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  if lead < 0 or a.shape[-1] != b.shape[lead] or a.shape[:lead] != b.shape[:lead]:
    raise ValueError(f'LoRA factors {a.shape} and {b.shape} do not fit kernel {kernel.shape}')
  r = a.shape[-1]
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  if tuple(kernel.shape) != tuple(a.shape[:lead]) + tuple(in_shape) + tuple(out_shape):
    raise ValueError(f'LoRA factors {a.shape} and {b.shape} do not fit kernel {kernel.shape}')
  af = jnp.asarray(a, jnp.float32).reshape(a.shape[:lead] + (-1, r))
  bf = jnp.asarray(b, jnp.float32).reshape(b.shape[:lead] + (r, -1))
  delta = jnp.matmul(af, bf, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
  return (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)


def has_factors(params: Mapping) -> bool:
  """Whether a parameter tree holds LoRA factors."""
  if not isinstance(params, Mapping):
    return False
  return 'lora_a' in params or any(has_factors(v) for v in params.values())
