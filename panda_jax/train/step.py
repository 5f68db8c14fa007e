"""The train state and the jitted train step (gradient accumulation, frozen parameters).

The step differentiates only the trainable parameters (frozen ones enter as constants, so no
weight gradients and no optimizer state exist for them), accumulates gradients over
micro-batches with `lax.scan`, weighting every micro-batch by the whole batch's token and frame
counts so the result equals one large batch, and refuses a non-finite update: parameters,
BatchNorm statistics and optimizer state stay as they were, `state.step` still advances (it
counts batches, as the loop does) and `state.refused` counts the refusal on the device, so the
loop needs no per-step host sync to notice it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from panda_jax.train.optimizer import FROZEN
from panda_jax.tree import flatten, unflatten


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # batches taken (applied or refused); equals the loop's step
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  refused: jax.Array     # steps refused for a non-finite loss, gradient or BatchNorm statistic


def trainable_tree(params: Mapping, labels: Mapping[str, str]):
  """(nested trainable params, flat frozen params)."""
  flat = flatten(params)
  train = {k: v for k, v in flat.items() if labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
  return unflatten(train), frozen


def merge(train_nested: Mapping, frozen_flat: Mapping) -> dict:
  return unflatten({**flatten(train_nested), **frozen_flat})


def init_state(params, batch_stats, labels, tx, rng) -> TrainState:
  train, _ = trainable_tree(params, labels)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(train), rng=rng, refused=jnp.zeros((), jnp.int32))


def batch_totals(batch: Mapping) -> dict:
  """Token and frame counts of the whole batch (the denominators of both losses); tokens are
  the positions `cross_entropy` predicts (a label >= 0)."""
  tokens = jnp.sum(batch['labels'][:, 1:] >= 0)
  frames = jnp.sum(batch['teacher_valid'] & jnp.any(batch['patch_valid'], axis=-1))
  return {'tokens': jnp.maximum(tokens, 1).astype(jnp.float32),
          'frames': jnp.maximum(frames, 1).astype(jnp.float32)}


def teacher_targets(teacher: nn.Module, params, frames: jax.Array) -> jax.Array:
  """The frozen teacher's features of `frames` [B, F, H, W, 3]: no gradient reaches `params`.

  The teacher sees every frame of a clip, padding frames of short videos included: its temporal
  attention spans the whole clip, as in the reference, so dropping them would change the
  features of the frames with content. The loss counts only frames with content
  (`teacher_valid`).
  """
  return jax.lax.stop_gradient(teacher.apply({'params': params}, frames))


def make_train_step(model: nn.Module, labels: Mapping[str, str], tx: optax.GradientTransformation,
                    schedules: Mapping[str, Callable], accum_steps: int = 1,
                    distill_weight: float = 1.0, teacher: nn.Module | None = None,
                    return_grads: bool = False):
  """Returns `step(state, batch, teacher_params=None) -> (state, metrics)` (the caller jits it).

  `batch` holds the global batch; its leading dim must be a multiple of `accum_steps`. With a
  `teacher` module the distillation targets are computed in the step from
  `batch['teacher_pixels']` (frozen: no gradient, no optimizer state); otherwise the batch
  carries them as `batch['teacher']` (cached features). `return_grads` (for tests) adds the
  accumulated gradients of the trainable parameters, before clipping, as `metrics['grads']`;
  without it the step computes and returns exactly what it did before.
  """

  def loss_fn(train, frozen, batch_stats, micro, rng, totals):
    params = merge(train, frozen)
    out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, micro,
                               train=True, rngs={'dropout': rng}, mutable=['batch_stats'])
    ce = out['ce_sum'] / totals['tokens']
    dl = out['distill_sum'] / totals['frames']
    return ce + distill_weight * dl, (ce, dl, updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Mapping, teacher_params=None):
    batch = dict(batch)
    b = batch['labels'].shape[0]
    if b % accum_steps:
      raise ValueError(f'global batch {b} is not a multiple of accum_steps={accum_steps}')
    rng, step_rng = jax.random.split(state.rng)
    totals = batch_totals(batch)
    # Micro-batch i takes rows i, i + accum, ...: every micro-batch is spread over all the
    # devices the batch is sharded on (contiguous blocks would sit on a few devices and make
    # XLA shard the accumulation axis instead).
    # The [B // accum, accum, ...] view is free; each step slices its column inside the loop
    # (a transposed copy of the whole batch would cost as much memory as the batch).
    grid = jax.tree.map(lambda a: a.reshape((b // accum_steps, accum_steps) + a.shape[1:]),
                        dict(batch))
    train, frozen = trainable_tree(state.params, labels)
    zeros = jax.tree.map(jnp.zeros_like, train)

    def body(carry, xs):
      grads, stats, loss, ce, dl = carry
      i, r = xs
      mb = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False),
                        grid)
      if teacher is not None:
        # The teacher runs per micro-batch, so its activations never exist for the whole batch.
        mb['teacher'] = teacher_targets(teacher, teacher_params, mb.pop('teacher_pixels'))
      (l, (c, d, stats)), g = grad_fn(train, frozen, stats, mb, r, totals)
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, stats, loss + l, ce + c, dl + d), None

    init = (zeros, state.batch_stats, 0.0, 0.0, 0.0)
    keys = jax.random.split(step_rng, accum_steps)
    (grads, stats, loss, ce, dl), _ = jax.lax.scan(
        body, init, (jnp.arange(accum_steps), keys))
    grad_norm = optax.tree.norm(grads)
    # The new BatchNorm statistics are checked too: they are kept, not differentiated, so a
    # non-finite value in them need not show in the loss or the gradient norm.
    stats_finite = jax.tree.reduce(lambda a, x: a & jnp.all(jnp.isfinite(x)), stats,
                                   jnp.array(True))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & stats_finite
    updates, opt_state = tx.update(grads, state.opt_state, train)
    new_train = optax.apply_updates(train, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    refused = state.refused + (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=merge(keep(new_train, train), frozen),
        batch_stats=keep(stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        rng=rng, refused=refused)
    metrics = {'loss': loss, 'ce': ce, 'distill': dl, 'grad_norm': grad_norm,
               'tokens': totals['tokens'], 'finite': finite.astype(jnp.int32),
               'refused': refused}
    # The optimizer's schedules count applied updates (a refused step leaves its state, count
    # included, unchanged): the rate this step used is at step - refused-before-it.
    for g, sched in schedules.items():
      metrics[f'lr/{g}'] = sched(state.step - state.refused)
    if return_grads:
      metrics['grads'] = grads
    return new_state, metrics

  return step
