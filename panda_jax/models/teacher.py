"""The frozen distillation teacher: LanguageBind's video encoder (spec section 5).

A CLIP ViT (ViT-L/14 at 224 px in the release) whose every encoder layer first runs a
temporal step, then the usual pre-norm spatial block:

  x = x + temporal_embedding[:t]            (per frame of a clip, every token, CLS included)
  x = x + temporal_attn(temporal_norm(x))   (at each token position, across the t frames)
  x = x + attn(norm1(x))                    (across the tokens of a frame)
  x = x + mlp(norm2(x))

The clip length t is the config's `num_frames` (8 in the release): consecutive groups of t
frames of a video attend to each other. Video-Panda hands the tower chunks of 4 frames, but the
tower flattens them to frames and regroups by its own num_frames, so the temporal attention
spans all 8 frames of a video. Both attentions are Hugging Face `CLIPAttention`s (q/k/v/out
projections with biases, scale head_dim ** -0.5, no mask).

The targets are `hidden_states[select_layer]` (-2: the output of the second-to-last layer,
without the post-LayerNorm) with the CLS token dropped; only the layers up to the selected one
are built and run. `temporal=False` is a plain CLIP ViT applied frame by frame (the paper's
CLIP teacher ablation).

Shapes: B videos, F frames (a multiple of num_frames when temporal), G = image_size / patch_size,
N = G * G patches, C = hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from panda_jax.models.layers import Dense, gelu_exact, layer_norm, partitioned, quick_gelu

Dtype = Any

# Logical axis names (unlisted in the sharding rules, hence replicated, except `teacher_embed`,
# which the distillation head shares).
EMBED = 'teacher_embed'
MLP = 'teacher_mlp'
HEADS = 'teacher_heads'
KV = 'teacher_kv'                  # head dim
POSITIONS = 'teacher_positions'    # CLS + patches
FRAMES = 'teacher_frames'          # temporal embedding table rows
PATCH_ROW = 'teacher_patch_row'    # pixel row inside a patch
PATCH_COL = 'teacher_patch_col'
RGB = 'teacher_rgb'

ACTIVATIONS = {'gelu': gelu_exact, 'quick_gelu': quick_gelu}


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Sizes of the teacher. Defaults: LanguageBind_Video_merge (ViT-L/14, 224 px, 8 frames)."""
  hidden: int = 1024
  layers: int = 24
  heads: int = 16
  mlp: int = 4096
  patch_size: int = 14
  image_size: int = 224
  # Rows of the temporal embedding table and the clip length of the temporal attention.
  num_frames: int = 8
  # 'gelu' (exact, LanguageBind) or 'quick_gelu' (OpenAI CLIP).
  activation: str = 'gelu'
  # False: plain CLIP ViT, frames independent (no temporal parameters).
  temporal: bool = True
  # Hugging Face `hidden_states` index: 0 = embeddings after the pre-LayerNorm, k = output of
  # layer k, negative from the end (-1 = last layer, -2 = second to last).
  select_layer: int = -2
  ln_eps: float = 1e-5

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def run_layers(self) -> int:
    """Encoder layers computed (and parameterised) to reach `select_layer`."""
    return self.select_layer + self.layers + 1 if self.select_layer < 0 else self.select_layer

  def validate(self) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size={self.image_size} is not a multiple of '
                       f'patch_size={self.patch_size}')
    if self.hidden % self.heads:
      raise ValueError(f'hidden={self.hidden} is not divisible by heads={self.heads}')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}')
    if not 0 <= self.run_layers <= self.layers:
      raise ValueError(f'select_layer={self.select_layer} is outside the hidden states of a '
                       f'{self.layers}-layer encoder ([-{self.layers + 1}, {self.layers}])')
    if self.num_frames < 1:
      raise ValueError(f'num_frames={self.num_frames} must be positive')


class TeacherAttention(nn.Module):
  """Hugging Face CLIPAttention: biased q/k/v/out projections, scale head_dim ** -0.5.

  `temporal=False`: x [M, S, C], attention over S. `temporal=True`: x [K, T, S, C], attention
  over T at each of the S positions (no transposes of the activations).
  """
  hidden: int
  heads: int
  temporal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.heads
    d = self.hidden // h
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: Dense((h, d), (EMBED,), (HEADS, KV), name=name, **kw)(x)
    q = proj('q') * jnp.asarray(d ** -0.5, self.dtype)
    k, v = proj('k'), proj('v')
    if self.temporal:
      scores_spec, ctx_spec = 'ktshd,kushd->kshtu', 'kshtu,kushd->ktshd'
    else:
      scores_spec, ctx_spec = 'mthd,muhd->mhtu', 'mhtu,muhd->mthd'
    scores = jnp.einsum(scores_spec, q, k, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    ctx = jnp.einsum(ctx_spec, attn, v)
    return Dense(self.hidden, (HEADS, KV), (EMBED,), name='out', **kw)(ctx)


class TeacherLayer(nn.Module):
  """One encoder layer on frames x [B*F, 1 + N, C] (frames of a clip consecutive)."""
  cfg: TeacherConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    c = cfg.hidden
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: layer_norm(EMBED, name=name, eps=cfg.ln_eps, **kw)
    if cfg.temporal:
      t = cfg.num_frames
      bf, n, _ = x.shape
      xt = x.reshape(bf // t, t, n, c)          # [clips, T, 1 + N, C]: a free reshape
      table = self.param('temporal_embed', partitioned(nn.initializers.normal(c ** -0.5),
                                                       (FRAMES, EMBED)),
                         (cfg.num_frames, c), self.param_dtype)
      if t != 1:  # LanguageBind skips the embedding (not the attention) for one-frame clips
        xt = xt + table[:t, None, :].astype(self.dtype)
      y = ln('temporal_norm')(xt)
      y = TeacherAttention(c, cfg.heads, temporal=True, name='temporal_attn', **kw)(y)
      x = (xt + y).reshape(bf, n, c)
    y = ln('norm1')(x)
    x = x + TeacherAttention(c, cfg.heads, name='attn', **kw)(y)
    y = ln('norm2')(x)
    y = Dense(cfg.mlp, (EMBED,), (MLP,), name='fc1', **kw)(y)
    y = ACTIVATIONS[cfg.activation](y)
    return x + Dense(c, (MLP,), (EMBED,), name='fc2', **kw)(y)


class VideoTeacher(nn.Module):
  """Frames [B, F, H, W, 3] (normalised RGB, H = W = image_size) -> [B, F, N, C] patch tokens.

  With `output_hidden_states=True` returns a dict with `features` and `hidden_states`
  [run_layers + 1, B, F, 1 + N, C] (CLS included; entry 0 = the pre-LayerNorm'd embeddings,
  entry k = output of layer k), as Hugging Face numbers them.
  """
  cfg: TeacherConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, frames: jax.Array, output_hidden_states: bool = False):
    cfg = self.cfg
    cfg.validate()
    b, f, hgt, wid, ch = frames.shape
    if (hgt, wid, ch) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f'frames have shape {frames.shape}; expected [B, F, {cfg.image_size}, '
                       f'{cfg.image_size}, 3]')
    if cfg.temporal and f % cfg.num_frames:
      raise ValueError(f'{f} frames per video is not a multiple of the teacher clip length '
                       f'num_frames={cfg.num_frames}')
    c, p, g = cfg.hidden, cfg.patch_size, cfg.grid
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    # Patch embedding (conv p x p, stride p, no bias) as one matmul over the patch pixels.
    x = frames.astype(self.dtype).reshape(b * f, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = Dense(c, (PATCH_ROW, PATCH_COL, RGB), (EMBED,), use_bias=False, name='patch_embed',
              **kw)(x).reshape(b * f, g * g, c)
    cls = self.param('class_embed', partitioned(nn.initializers.normal(c ** -0.5), (EMBED,)),
                     (c,), self.param_dtype).astype(self.dtype)
    pos = self.param('pos_embed', partitioned(nn.initializers.normal(0.02), (POSITIONS, EMBED)),
                     (1 + g * g, c), self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b * f, 1, c)), x], axis=1) + pos
    x = layer_norm(EMBED, name='pre_norm', eps=cfg.ln_eps, **kw)(x)

    states = [x]
    for i in range(cfg.run_layers):
      x = TeacherLayer(cfg, name=f'layers_{i}', **kw)(x)
      if output_hidden_states:
        states.append(x)
    features = x[:, 1:].reshape(b, f, g * g, c)
    if not output_hidden_states:
      return features
    hidden = jnp.stack(states).reshape(len(states), b, f, 1 + g * g, c)
    return {'features': features, 'hidden_states': hidden}
