"""Video-Panda: STAB + projector -> spliced into the prompt -> Llama, with distillation.

The host lays the sequence out (`panda_jax.data.assembly.layout_batch`); the device embeds the
text ids, gathers each frame's visual tokens into their positions, runs the decoder and
computes next-token cross-entropy plus the distillation loss on the hidden states at the patch
positions (spec sections 4-5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from panda_jax.models.distill import LOSSES, DistillConfig, DistillHead
from panda_jax.models.llama import Llama, LlamaConfig
from panda_jax.models.stab import StabConfig, VisualTokenizer

Dtype = Any


@dataclasses.dataclass(frozen=True)
class PandaConfig:
  stab: StabConfig = StabConfig()
  llm: LlamaConfig = LlamaConfig()
  distill: DistillConfig = DistillConfig()
  distill_weight: float = 1.0

  def validate(self) -> None:
    self.stab.validate()
    self.llm.validate()
    self.distill.validate(self.llm.layers)
    if self.stab.llm_hidden != self.llm.hidden or self.distill.llm_hidden != self.llm.hidden:
      raise ValueError(f'LLM width mismatch: stab.llm_hidden={self.stab.llm_hidden}, '
                       f'distill.llm_hidden={self.distill.llm_hidden}, '
                       f'llm.hidden={self.llm.hidden}')


def cross_entropy(logits: jax.Array, labels: jax.Array):
  """Mean next-token cross-entropy over positions whose next label is a token id; negative
  labels (the data's IGNORE, -100: prompt, padding, visual slots) are not predicted.

  logits [B, L, V], labels [B, L]; returns (mean, token count, sum).
  """
  return target_cross_entropy(logits[:, :-1], labels[:, 1:])


def target_cross_entropy(logits: jax.Array, targets: jax.Array):
  """Cross-entropy of logits [B, P, V] against targets [B, P] (each position's own; negative:
  not scored) -> (mean, token count, sum)."""
  lg = logits.astype(jnp.float32)
  keep = targets >= 0
  logz = jax.nn.logsumexp(lg, axis=-1)
  picked = jnp.take_along_axis(lg, jnp.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
  nll = jnp.where(keep, logz - picked, 0.0)
  count = jnp.sum(keep)
  total = jnp.sum(nll)
  return total / jnp.maximum(count, 1), count, total


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, chunk: int,
                          dtype=jnp.float32):
  """`cross_entropy(logits, labels)` with `logits = (hidden @ kernel).astype(float32)` (the LM
  head as `Dense` computes it, in `dtype`), formed `chunk` positions at a time.

  hidden [B, L, E] (the final-norm output), kernel [E, V], labels [B, L]. Each block's logits
  [B, chunk, V] exist only inside that block and are recomputed for its backward pass, so
  neither the forward nor the gradient ever holds [B, L, V]. Position t is scored against
  label t + 1 (the last against nothing); L is padded up to a multiple of `chunk` with
  positions that count nothing. Each position's log-softmax spans the whole vocabulary, so
  the result is the full computation's up to float summation order.
  Returns (mean, token count, sum), as `cross_entropy`.
  """
  if chunk <= 0:
    raise ValueError(f'chunk={chunk} must be positive')
  b, length, e = hidden.shape
  # -1 marks the positions that predict nothing (as every negative label does).
  tgt = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), -1, labels.dtype)], axis=1)
  count = jnp.sum(tgt >= 0)
  pad = -length % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(tgt, ((0, 0), (0, pad)), constant_values=-1)
  n = (length + pad) // chunk
  blocks = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)          # [n, B, chunk, E]
  tgts = tgt.reshape(b, n, chunk).swapaxes(0, 1)
  w = kernel.astype(dtype)

  def block(h, t):
    logits = jax.lax.dot_general(h.astype(dtype), w, (((2,), (0,)), ((), ())))
    logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                        ('act_batch', 'act_length', 'act_vocab'))
    keep = t >= 0
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(keep, t, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, logz - picked, 0.0))

  one = jax.checkpoint(block, prevent_cse=False)
  total = jnp.sum(jax.lax.map(lambda xs: one(*xs), (blocks, tgts)))
  return total / jnp.maximum(count, 1), count, total


def learned_positions(labels: jax.Array, k: int):
  """The first `k` positions of each row whose next label is learned (>= 0), in order, and
  their targets: -> (positions int32 [B, k], targets [B, k]; -1 where a row has fewer).
  A row with more than `k` loses the rest (`learned_overflow` counts them)."""
  b, length = labels.shape
  tgt = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), -1, labels.dtype)], axis=1)
  keep = tgt >= 0
  # A stable sort on "not learned" puts the learned positions first, in their order.
  order = jnp.argsort(~keep, axis=1, stable=True)[:, :k].astype(jnp.int32)
  if k > length:
    order = jnp.pad(order, ((0, 0), (0, k - length)))
  picked = jnp.take_along_axis(tgt, order, axis=1)
  slot = jnp.arange(k)[None, :] < jnp.sum(keep, axis=1, keepdims=True)
  return order, jnp.where(slot, picked, -1)


def learned_overflow(labels: jax.Array, k: int) -> np.ndarray:
  """Per row (host, numpy), how many learned next-token targets lie beyond the first `k`:
  nonzero rows would lose part of their loss with `llm.loss_positions=k`."""
  labels = np.asarray(labels)
  count = np.sum(labels[..., 1:] >= 0, axis=-1)
  return np.maximum(count - k, 0)


class VideoPanda(nn.Module):
  cfg: PandaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual = VisualTokenizer(self.cfg.stab, **kw)
    self.llm = Llama(self.cfg.llm, **kw)
    # With distill.loss='none' (ablation) the model has no distillation head.
    if self.cfg.distill.loss != 'none':
      self.distill = DistillHead(self.cfg.distill, **kw)

  def embed_inputs(self, batch: dict, *, train: bool = False, deterministic: bool | None = None):
    """Visual tokens spliced into the text embeddings: -> ([B, L, E], visual outputs)."""
    vis = self.visual(batch['pixels'], batch['mask'], train=train, deterministic=deterministic)
    tokens = vis['tokens']                                   # [B, F, slots, E]
    b, f, n, e = tokens.shape
    flat = tokens.reshape(b, f * n, e)
    idx = batch['visual_index']
    from_video = jnp.take_along_axis(flat, jnp.maximum(idx, 0)[..., None], axis=1)
    text = self.llm.embed(batch['text_ids'])
    embeds = jnp.where((idx >= 0)[..., None], from_video.astype(text.dtype), text)
    return embeds, vis

  def __call__(self, batch: dict, *, train: bool = False, deterministic: bool | None = None,
               with_distill: bool = True):
    """Forward and losses.

    batch: `layout_batch` arrays plus pixels [B, F, H, W, 3], mask [B, F, H, W] and, for
    distillation, teacher [B, F, S*S, T] (the teacher's full patch grid per frame) and
    teacher_valid bool [B, F] (frames with teacher content).
    Returns dict: loss, ce, distill, logits [B, L, V] ([B, K, V] at the gathered positions with
    `llm.loss_positions` = K; none with `llm.loss_chunk`, whose loss never forms them), tokens (counted), frame_loss [B, F],
    and the sums behind the means (`ce_sum`, `distill_sum`, `distill_frames`), which gradient
    accumulation uses to weight micro-batches exactly like one large batch. With
    `cfg.distill.loss == 'none'` the distillation entries are zeros (no teacher is read).
    """
    loss_fn = LOSSES[self.cfg.distill.loss]
    if with_distill and loss_fn is None:
      b, f = batch['patch_pos'].shape[:2]
      with_distill = False
      zeros = dict(distill=jnp.zeros((), jnp.float32), frame_loss=jnp.zeros((b, f), jnp.float32),
                   distill_sum=jnp.zeros((), jnp.float32), distill_frames=jnp.zeros((), jnp.int32))
    else:
      zeros = {}
    embeds, _ = self.embed_inputs(batch, train=train, deterministic=deterministic)
    valid = batch['valid']
    b, length = valid.shape
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    f, p = batch['patch_pos'].shape[1:]
    chunk, k = self.cfg.llm.loss_chunk, self.cfg.llm.loss_positions
    gather, targets = learned_positions(batch['labels'], k) if k else (None, None)
    out = self.llm(embeds, slots, valid, output_hidden_states=with_distill,
                   hidden_gather=batch['patch_pos'].reshape(b, f * p) if with_distill else None,
                   logits=bool(k) or not chunk, logits_gather=gather,
                   deterministic=(not train) if deterministic is None else deterministic)
    if k:
      # Logits at the gathered positions only, each scored against its own next token.
      ce, count, ce_sum = target_cross_entropy(out['logits'], targets)
      result = {'logits': out['logits']}
    elif chunk:
      ce, count, ce_sum = chunked_cross_entropy(out['normed'], self.llm.head_kernel(),
                                                batch['labels'], chunk, self.dtype)
      result = {}
    else:
      ce, count, ce_sum = cross_entropy(out['logits'], batch['labels'])
      result = {'logits': out['logits']}
    result.update(ce=ce, tokens=count, ce_sum=ce_sum)
    if with_distill:
      hs = out['hidden_states'][jnp.asarray(self.cfg.distill.layers)]   # [K, B, F*P, E]
      student = self.distill(hs.reshape(hs.shape[:2] + (f, p, hs.shape[-1])))
      teacher = jnp.take_along_axis(batch['teacher'], batch['teacher_cell'][..., None], axis=2)
      dl, frame_loss = loss_fn(student, teacher, batch['patch_valid'], batch['teacher_valid'])
      counted = batch['teacher_valid'] & jnp.any(batch['patch_valid'], axis=-1)
      result.update(distill=dl, frame_loss=frame_loss,
                    distill_sum=jnp.sum(jnp.where(counted, frame_loss, 0.0)),
                    distill_frames=jnp.sum(counted),
                    loss=ce + self.cfg.distill_weight * dl)
    else:
      result.update(zeros, loss=ce)
    return result
