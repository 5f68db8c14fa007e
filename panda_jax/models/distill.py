"""Distillation head ("compressor") and the distillation losses (spec section 5).

The head reads the LLM's hidden states at each frame's patch positions for a list of layers
(Hugging Face numbering: 0 = embedding output, last = after the final norm), projects each
layer to the teacher width, lets the first projected layer attend over the others, and adds a
projection of the first layer's raw state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from panda_jax.models.layers import TORCH_LN_EPS, Dense, partitioned

Dtype = Any

LAYERS = 'distill_layers'
LLM_EMBED = 'embed'
TEACHER = 'teacher_embed'
TEACHER_IN = 'teacher_embed_in'  # input side of the teacher-width output layer


def default_layers(num_llm_layers: int, step: int = 4) -> tuple[int, ...]:
  """[L, L - step, ..., 0]: the released model uses [32, 28, ..., 4, 0]."""
  return tuple(range(num_llm_layers, -1, -step))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  llm_hidden: int = 4096
  teacher_hidden: int = 1024
  heads: int = 8
  layers: Sequence[int] = default_layers(32)
  # 'cosine' (1 - cosine similarity, released), 'mse' (mean squared error) or 'none' (no
  # distillation term and no head): the paper's Table 9 ablation.
  loss: str = 'cosine'

  def validate(self, num_llm_layers: int | None = None) -> None:
    if self.loss not in LOSSES:
      raise ValueError(f'distillation loss={self.loss!r}; expected one of {list(LOSSES)}')
    if len(self.layers) < 2:
      raise ValueError(f'distillation layers={list(self.layers)}: need at least 2 (one query '
                       'layer and one or more key/value layers)')
    if self.teacher_hidden % self.heads:
      raise ValueError(f'teacher_hidden={self.teacher_hidden} is not divisible by '
                       f'heads={self.heads}')
    if num_llm_layers is not None:
      bad = [l for l in self.layers if not 0 <= l <= num_llm_layers]
      if bad:
        raise ValueError(f'distillation layers {bad} are outside [0, {num_llm_layers}] for an '
                         f'LLM with {num_llm_layers} layers')


class DistillHead(nn.Module):
  """Selected hidden states [K, ..., L] (in `cfg.layers` order) -> prediction [..., T]."""
  cfg: DistillConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.cfg
    k, l, t, h = len(cfg.layers), cfg.llm_hidden, cfg.teacher_hidden, cfg.heads
    if hidden.shape[0] != k or hidden.shape[-1] != l:
      raise ValueError(f'hidden states have shape {hidden.shape}; expected [{k}, ..., {l}] '
                       f'(the layers {list(cfg.layers)} at width {l})')
    pd = self.param_dtype
    ln_scale = self.param('norm_scale', partitioned(nn.initializers.ones, (LAYERS, LLM_EMBED)),
                          (k, l), pd)
    ln_bias = self.param('norm_bias', partitioned(nn.initializers.zeros, (LAYERS, LLM_EMBED)),
                         (k, l), pd)
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                            in_axis=-2, out_axis=-1, batch_axis=(0,))
    proj = self.param('proj_kernel', partitioned(init, (LAYERS, LLM_EMBED, TEACHER)), (k, l, t),
                      pd)
    # Per-layer LayerNorm (float32 statistics) then projection to the teacher width.
    x = hidden.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + TORCH_LN_EPS)
    bshape = (k,) + (1,) * (hidden.ndim - 2) + (l,)
    x = x * ln_scale.reshape(bshape) + ln_bias.reshape(bshape)
    z = jnp.einsum('k...l,klt->k...t', x.astype(self.dtype), proj.astype(self.dtype))
    # The first projected layer queries the others (no further projections), full-width scale.
    zh = z.reshape(z.shape[:-1] + (h, t // h))
    q, kv = zh[0], zh[1:]
    scores = jnp.einsum('...hd,k...hd->...hk', q, kv,
                        preferred_element_type=jnp.float32) * t ** -0.5
    attn = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    fused = jnp.einsum('...hk,k...hd->...hd', attn, kv).reshape(z.shape[1:])
    kw = dict(dtype=self.dtype, param_dtype=pd)
    out = Dense(t, (TEACHER_IN,), (TEACHER,), name='output_layer', **kw)(fused)
    return Dense(t, (LLM_EMBED,), (TEACHER,), name='input_layer', **kw)(hidden[0]) + out


def cosine_distill_loss(student: jax.Array, teacher: jax.Array, patch_valid: jax.Array,
                        frame_valid: jax.Array, eps: float = 1e-8):
  """1 - mean cosine similarity per frame, averaged over frames with teacher content.

  Args:
    student, teacher: [..., F, P, T] predictions and targets.
    patch_valid: bool [..., F, P], the patches that exist in both (unpadded region).
    frame_valid: bool [..., F], frames with teacher content.
  Returns:
    (loss scalar, frame_loss [..., F]); frames without content contribute nothing.
  """
  s = student.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  dot = jnp.sum(s * t, axis=-1)
  ns = jnp.maximum(jnp.linalg.norm(s, axis=-1), eps)
  nt = jnp.maximum(jnp.linalg.norm(t, axis=-1), eps)
  cos = dot / (ns * nt)
  pv = patch_valid.astype(jnp.float32)
  mean_cos = jnp.sum(cos * pv, axis=-1) / jnp.maximum(jnp.sum(pv, axis=-1), 1.0)
  frame_loss = 1.0 - mean_cos
  fv = frame_valid.astype(jnp.float32) * (jnp.sum(pv, axis=-1) > 0)
  loss = jnp.sum(frame_loss * fv) / jnp.maximum(jnp.sum(fv), 1.0)
  return loss, frame_loss


def mse_distill_loss(student: jax.Array, teacher: jax.Array, patch_valid: jax.Array,
                     frame_valid: jax.Array):
  """Mean squared error per frame (over its valid patches and the feature width), averaged
  over frames with teacher content; arguments and result as `cosine_distill_loss`."""
  err = jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)), axis=-1)
  pv = patch_valid.astype(jnp.float32)
  frame_loss = jnp.sum(err * pv, axis=-1) / jnp.maximum(jnp.sum(pv, axis=-1), 1.0)
  fv = frame_valid.astype(jnp.float32) * (jnp.sum(pv, axis=-1) > 0)
  loss = jnp.sum(frame_loss * fv) / jnp.maximum(jnp.sum(fv), 1.0)
  return loss, frame_loss


# DistillConfig.loss -> loss function (None: no distillation).
LOSSES = {'cosine': cosine_distill_loss, 'mse': mse_distill_loss, 'none': None}
