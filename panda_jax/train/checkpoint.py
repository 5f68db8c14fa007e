"""Orbax checkpoints of a training run: one step = params + batch statistics + optimizer state
+ step/rng + every process's data iterator state, saved together and restored together.

The data item (`data`, one JSON written by process 0) holds the iterator states of all
processes, gathered at the save: `{"process_count": N, "processes": [state_0, ..., state_N-1]}`.
On restore each process takes its own (`process_data_state`); on another process count the
iterator may map the states onto the new processes (`TrainIterator.state_from`) or refuse.
Checkpoints written before (one state, process 0's, at the top level) still restore: every
process gets that state, as it did then.

Items are separate so a later stage can take only `params` and `batch_stats` from an earlier
stage's run (`load_params`), whatever optimizer that run used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from panda_jax import storage
from panda_jax.data.pipeline import DataStateError  # noqa: F401  (raised here, and re-exported)
from panda_jax.workdir import ITEMS, latest_step
from panda_jax.tree import flatten, unflatten

# Orbax's "replica-parallel" saving splits every replicated shard into one slice per replica
# (each written by its own host), and each slice is cut on the device by a small compiled
# program, one per array shape and slice. Below a few MiB per slice spreading the write gains
# nothing and those compiles cost: on a tiny model over a 4 x 2 mesh of CPU devices they were
# 13 s of a 35 s four-step run with two saves. Arrays whose slices would be smaller than this
# are written whole by their first replica (the 7B model's large weights still split).
MIN_REPLICA_PARALLEL_SLICE_BYTES = 4 << 20
# The keys of the data item: how many processes saved it, and their states in process order.
PROCESS_COUNT, PROCESSES = 'process_count', 'processes'


def _allgather_json(obj) -> list:
  """`obj` (JSON-able) of every process, in process order (a collective: every process calls
  it)."""
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64)))
  sizes = sizes.reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(every[i, :sizes[i]].tobytes().decode()) for i in range(len(sizes))]


def gather_data_states(data_state: Mapping | None, gather=None) -> dict:
  """The data item of a checkpoint: every process's iterator state (every process must call
  this; `gather` fakes the processes in tests)."""
  local = dict(data_state or {})
  if gather is None:
    gather = _allgather_json if jax.process_count() > 1 else (lambda x: [x])
  states = [dict(s) for s in gather(local)]
  return {PROCESS_COUNT: len(states), PROCESSES: states}


def process_data_state(saved: Mapping, index: int, count: int, convert=None) -> dict:
  """Process `index` of `count`'s iterator state from a checkpoint's data item `saved`.

  Saved by the same number of processes: its own. By another number: `convert(states)` (the
  iterator's `state_from`, which maps the saved positions onto this process or raises
  DataStateError), or a DataStateError naming both counts when the iterator has no such map.
  A checkpoint of before (one state at the top level) gives that state to every process.
  """
  saved = dict(saved or {})
  if PROCESSES not in saved:
    return saved
  states = list(saved[PROCESSES])
  if convert is not None:
    return dict(convert(states))
  if len(states) != count:
    raise DataStateError(
        f'the checkpoint\'s data iterator states were saved by {len(states)} processes and '
        f'this run has {count}: this iterator cannot map them onto another process count; '
        f'resume on {len(states)} processes')
  return dict(states[index])


def _register_array_handler() -> None:
  """Orbax's handler of jax.Array with MIN_REPLICA_PARALLEL_SLICE_BYTES, in Orbax's global
  registry (done by `manager`, before the first save, not at import)."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES),
      override=True)


def manager(workdir, save_every: int, keep: int, async_save: bool = True):
  """The CheckpointManager of a run's `workdir/checkpoints` (local or gs://)."""
  _register_array_handler()
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1, max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(storage.path(workdir) / 'checkpoints', options=options,
                               item_names=ITEMS)


def save(mngr, step: int, state, data_state: Mapping | None, force: bool = False,
         gather=None) -> None:
  """Saves `state` (a TrainState) and every process's iterator state (`data_state` is this
  process's; `gather_data_states`) as checkpoint `step`. Every process must call it.
  A model without BatchNorm statistics (`model.stab.lste=False`) saves no `batch_stats` item:
  Orbax refuses an empty tree."""
  data = gather_data_states(data_state, gather)
  items = dict(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.StandardSave({'step': state.step, 'rng': state.rng,
                                  'refused': state.refused}),
      data=ocp.args.JsonSave(data))
  if _has_leaves(state.batch_stats):
    items['batch_stats'] = ocp.args.StandardSave(state.batch_stats)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)


def _has_leaves(tree) -> bool:
  return bool(jax.tree.leaves(tree))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore(mngr, step: int, state, shardings):
  """-> (state with restored arrays in their shardings, the data item: every process's iterator
  state, see `process_data_state`)."""
  items = dict(
      params=ocp.args.StandardRestore(_abstract(state.params, shardings.params)),
      opt_state=ocp.args.StandardRestore(_abstract(state.opt_state, shardings.opt_state)),
      meta=ocp.args.StandardRestore(_abstract(
          {'step': state.step, 'rng': state.rng, 'refused': state.refused},
          {'step': shardings.step, 'rng': shardings.rng, 'refused': shardings.refused})),
      data=ocp.args.JsonRestore())
  stats = _has_leaves(state.batch_stats)
  if stats:
    items['batch_stats'] = ocp.args.StandardRestore(
        _abstract(state.batch_stats, shardings.batch_stats))
  r = mngr.restore(step, args=ocp.args.Composite(**items))
  new = state.replace(params=r.params, batch_stats=r.batch_stats if stats else state.batch_stats,
                      opt_state=r.opt_state, step=r.meta['step'], rng=r.meta['rng'],
                      refused=r.meta['refused'])
  return new, dict(r.data or {})


def _saved_metadata(path) -> dict[str, Any]:
  """{'a/b/c': metadata (shape, dtype; no data)} of a saved Orbax item."""
  meta = ocp.PyTreeCheckpointer().metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  meta = getattr(meta, 'tree', meta)
  return flatten(meta or {})


@dataclasses.dataclass(frozen=True)
class SavedTree:
  """A tree inside a saved Orbax item, read lazily: the item's directory, the '/'-joined path
  of the tree inside it (`within`, '' for the whole item: a training checkpoint's `params`;
  'params' in a converted `variables` item) and the prefix our paths put before its paths
  (`under`: 'llm/' for a converted plain llama, whose decoder fills our `llm/`)."""
  path: Any
  within: str = ''
  under: str = ''

  def shapes(self) -> dict[str, tuple]:
    """{our path (as `flatten` names our leaves): saved shape}, from the metadata alone."""
    lead = self.within + '/' if self.within else ''
    return {self.under + k[len(lead):]: tuple(m.shape)
            for k, m in _saved_metadata(self.path).items()
            if k.startswith(lead) and hasattr(m, 'shape')}

  def saved_key(self, ours: str) -> str:
    """The item's path of our leaf `ours` (one of `shapes()`'s keys)."""
    lead = self.within + '/' if self.within else ''
    return lead + ours[len(self.under):]


def _plan(params, batch_stats, src_params: Mapping, src_stats: Mapping, require, skip,
          what: str):
  """Which of our variables to take from a source, given the source's shapes by path.

  -> ({'params': [our paths], 'batch_stats': [...]}, report). A variable is taken when its path
  exists in the source with the same shape and does not match a `skip` regex; a variable
  matching a `require` regex that is not taken raises a ValueError naming them.
  """
  skip_re = [re.compile(p) for p in skip]
  report = {'loaded': [], 'fresh': []}
  taken = {'params': [], 'batch_stats': []}
  for name, ours, src, prefix in (('params', params, src_params, ''),
                                  ('batch_stats', batch_stats, src_stats, 'batch_stats/')):
    for k, v in flatten(ours or {}).items():
      path = prefix + k
      shape = (src or {}).get(k)
      if shape is not None and tuple(shape) == tuple(v.shape) and \
          not any(r.search(path) for r in skip_re):
        taken[name].append(k)
        report['loaded'].append(path)
      else:
        report['fresh'].append(path)
  missing = [p for p in report['fresh'] if any(re.search(r, p) for r in require)]
  if missing:
    raise ValueError(f'initialising from {what}: {len(missing)} required variables were not '
                     f'found there with the same shape: {missing[:8]}')
  return taken, report


def _restore_sharded(saved: SavedTree, ours: Mapping[str, Any], keys) -> dict[str, Any]:
  """{our path: jax.Array} of `keys`, restored from `saved` straight into the shardings and
  dtypes of our leaves (`ours`, flat): each process reads only the shards its devices hold,
  and nothing else of the item is read."""
  keys = list(keys)
  if not keys:
    return {}
  item = unflatten({saved.saved_key(k): jax.ShapeDtypeStruct(
      ours[k].shape, ours[k].dtype, sharding=ours[k].sharding) for k in keys})
  restored = ocp.PyTreeCheckpointer().restore(saved.path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  flat = flatten(restored)
  return {k: flat[saved.saved_key(k)] for k in keys}


def restore_matching(params, batch_stats, src_params: SavedTree,
                     src_stats: SavedTree | None = None, require=(), skip=(),
                     what: str = 'source'):
  """`merge_matching` from saved Orbax trees, restoring only what is taken, directly sharded.

  Which variables are taken is decided from the saved metadata (shapes, no data); those are
  restored into our leaves' shardings and dtypes (`params`, `batch_stats`: jax.Arrays, e.g.
  born sharded by `sharding.init_sharded`), so no process holds the full tree in host memory.
  Returns (params, batch_stats, report) as `merge_matching` does.
  """
  taken, report = _plan(params, batch_stats, src_params.shapes(),
                        src_stats.shapes() if src_stats is not None else {}, require, skip,
                        what)
  out = []
  for name, ours, src in (('params', params, src_params), ('batch_stats', batch_stats,
                                                          src_stats)):
    flat = flatten(ours or {})
    flat.update(_restore_sharded(src, flat, taken[name]) if taken[name] else {})
    out.append(unflatten(flat))
  logging.info('initialised from %s: %d variables loaded, %d fresh (restored sharded)', what,
               len(report['loaded']), len(report['fresh']))
  return out[0], out[1], report


def load_params(source, params, batch_stats, require=(), skip=()):
  """Copies matching variables from another run's newest checkpoint (stage chaining).

  A variable is taken when its path exists in the source with the same shape and it does not
  match a `skip` regex; every variable matching a `require` regex must be taken (a typo in a
  path would otherwise silently train from scratch). Only the taken variables are read, each
  process reading just its shards into our leaves' shardings (`restore_matching`). Returns
  (params, batch_stats, report).
  """
  step = latest_step(source)
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {storage.join(source, "checkpoints")}')
  summary = storage.join(source, 'summary.json')
  if storage.exists(summary) and storage.read_json(summary).get('preempted'):
    # A preempted stage exits 0 (SLURM's afterok takes that for success): never chain from it.
    raise ValueError(f'init.from_run={source}: that run was preempted at step {step} before '
                     'its end (summary.json); rerun its command to finish it, then start this '
                     'stage')
  path = storage.path(source) / 'checkpoints' / str(step)
  # No item for a model without BatchNorm statistics (see `save`).
  stats = SavedTree(path / 'batch_stats') if storage.exists(path / 'batch_stats') else None
  return restore_matching(params, batch_stats, SavedTree(path / 'params'), stats, require,
                          skip, f'{source} step {step}')


def load_converted_params(converted, params, batch_stats, require=(), skip=()):
  """`load_params` from a converted checkpoint (`panda_jax.convert.checkpoint`): its
  `variables` item restored sharded, a converted plain llama's decoder into our `llm/`.
  Returns (params, batch_stats, report)."""
  from panda_jax.convert.checkpoint import read_converted_config
  kind, _ = read_converted_config(converted)
  path = storage.path(converted) / 'variables'
  if kind == 'llama':       # a converted decoder alone (e.g. Vicuna-7B) fills `llm/`
    src_params, src_stats = SavedTree(path, 'params', 'llm/'), None
  else:
    src_params = SavedTree(path, 'params')
    src_stats = SavedTree(path, 'batch_stats')
  return restore_matching(params, batch_stats, src_params, src_stats, require, skip,
                          str(converted))


def merge_matching(params, batch_stats, src_params, src_stats, require=(), skip=(),
                   what: str = 'source'):
  """Copies matching variables from host trees `src_params`, `src_stats` (the rules of
  `load_params`) into our (sharded) trees. Returns (params, batch_stats, report)."""
  taken, report = _plan(params, batch_stats,
                        {k: np.shape(v) for k, v in flatten(src_params or {}).items()},
                        {k: np.shape(v) for k, v in flatten(src_stats or {}).items()},
                        require, skip, what)
  out = []
  for name, ours, src in (('params', params, src_params), ('batch_stats', batch_stats,
                                                          src_stats)):
    flat, theirs = flatten(ours or {}), flatten(src or {})
    for k in taken[name]:
      flat[k] = jax.device_put(np.asarray(theirs[k]).astype(flat[k].dtype), flat[k].sharding)
    out.append(unflatten(flat))
  logging.info('initialised from %s: %d variables loaded, %d fresh', what,
               len(report['loaded']), len(report['fresh']))
  return out[0], out[1], report
