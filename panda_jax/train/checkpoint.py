"""Orbax checkpoints of a training run: one step = params + batch statistics + optimizer state
+ step/rng + the data iterator's state, saved together and restored together.

Items are separate so a later stage can take only `params` and `batch_stats` from an earlier
stage's run (`load_params`), whatever optimizer that run used.
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from panda_jax.tree import flatten, unflatten

ITEMS = ('params', 'batch_stats', 'opt_state', 'meta', 'data')


def manager(workdir, save_every: int, keep: int, async_save: bool = True):
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1, max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints',
                               options=options, item_names=ITEMS)


def save(mngr, step: int, state, data_state: Mapping | None, force: bool = False) -> None:
  """Saves `state` (a TrainState) and the iterator state as checkpoint `step`."""
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      batch_stats=ocp.args.StandardSave(state.batch_stats),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.StandardSave({'step': state.step, 'rng': state.rng,
                                  'refused': state.refused}),
      data=ocp.args.JsonSave(dict(data_state or {})))
  mngr.save(step, args=args, force=force)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore(mngr, step: int, state, shardings):
  """-> (state with restored arrays in their shardings, data iterator state dict)."""
  args = ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(state.params, shardings.params)),
      batch_stats=ocp.args.StandardRestore(_abstract(state.batch_stats, shardings.batch_stats)),
      opt_state=ocp.args.StandardRestore(_abstract(state.opt_state, shardings.opt_state)),
      meta=ocp.args.StandardRestore(_abstract(
          {'step': state.step, 'rng': state.rng, 'refused': state.refused},
          {'step': shardings.step, 'rng': shardings.rng, 'refused': shardings.refused})),
      data=ocp.args.JsonRestore())
  r = mngr.restore(step, args=args)
  new = state.replace(params=r.params, batch_stats=r.batch_stats, opt_state=r.opt_state,
                      step=r.meta['step'], rng=r.meta['rng'], refused=r.meta['refused'])
  return new, dict(r.data or {})


def latest_step(workdir) -> int | None:
  path = pathlib.Path(workdir).absolute() / 'checkpoints'
  if not path.exists():
    return None
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=ITEMS).latest_step()


def restore_variables(workdir) -> tuple[int, Any, Any]:
  """(step, params, batch_stats) of a run's newest checkpoint, as saved (host arrays)."""
  step = latest_step(workdir)
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {pathlib.Path(workdir) / "checkpoints"}')
  mngr = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints',
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=ITEMS)
  r = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                 batch_stats=ocp.args.StandardRestore()))
  return step, r.params, r.batch_stats


def load_params(source, params, batch_stats, require=(), skip=()):
  """Copies matching variables from another run's newest checkpoint (stage chaining).

  A variable is taken when its path exists in the source with the same shape and it does not
  match a `skip` regex; every variable matching a `require` regex must be taken (a typo in a
  path would otherwise silently train from scratch). Returns (params, batch_stats, report).
  """
  step, src_params, src_stats = restore_variables(source)
  return merge_matching(params, batch_stats, src_params, src_stats, require, skip,
                        f'{source} step {step}')


def merge_matching(params, batch_stats, src_params, src_stats, require=(), skip=(),
                   what: str = 'source'):
  skip_re = [re.compile(p) for p in skip]
  report = {'loaded': [], 'fresh': []}

  def take(ours: Mapping, theirs: Mapping, prefix: str):
    flat, src = flatten(ours), flatten(theirs or {})
    out = {}
    for k, v in flat.items():
      path = prefix + k
      s = src.get(k)
      if s is not None and tuple(np.shape(s)) == tuple(v.shape) and \
          not any(r.search(path) for r in skip_re):
        out[k] = jax.device_put(np.asarray(s).astype(v.dtype), v.sharding)
        report['loaded'].append(path)
      else:
        out[k] = v
        report['fresh'].append(path)
    return unflatten(out)

  new_params = take(params, src_params, '')
  new_stats = take(batch_stats, src_stats, 'batch_stats/')
  missing = [p for p in report['fresh']
             if any(re.search(r, p) for r in require)]
  if missing:
    raise ValueError(f'initialising from {what}: {len(missing)} required variables were not '
                     f'found there with the same shape: {missing[:8]}')
  logging.info('initialised from %s: %d variables loaded, %d fresh', what,
               len(report['loaded']), len(report['fresh']))
  return new_params, new_stats, report
