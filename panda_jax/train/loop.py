"""The training loop: born-sharded state, jitted step, Orbax checkpoints, resume, metrics.

`train(config, workdir, iterator)` runs `config.train.steps` optimizer steps of the stage the
config describes. The iterator yields host batches (numpy dicts with the global batch on one
process, or this process's share with several) and has `get_state()` / `set_state()`; its state
is saved with every checkpoint (every process's), so a resumed run sees exactly the batches it
would have seen.
At its end (also when SIGTERM stops it early: every process after the same step, with a
checkpoint there; `_Preemption`) process 0 writes `workdir/summary.json` (`write_summary`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from panda_jax import config as config_lib
from panda_jax import sharding
from panda_jax import storage
from panda_jax.models.panda import VideoPanda, learned_overflow
from panda_jax.train import checkpoint as ckpt
from panda_jax.train import metrics as metrics_lib
from panda_jax.teacher.model import create_teacher
from panda_jax.train.optimizer import (cast_frozen, frozen_dtype, make_optimizer, param_labels,
                                       state_shardings)
from panda_jax.tree import flatten
from panda_jax.train.step import TrainState, make_train_step, trainable_tree


class NonFiniteError(RuntimeError):
  """Too many steps were refused for non-finite values, or the state to save was not finite;
  the newest checkpoint (all finite) is kept."""


@jax.jit
def _all_finite(state) -> jax.Array:
  """Whether every floating-point leaf of `state` is finite (one device-side reduction)."""
  ok = jnp.array(True)
  for x in jax.tree.leaves(state):
    if jnp.issubdtype(x.dtype, jnp.floating):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def _global_batch(host: Mapping[str, np.ndarray], shardings, spec=None) -> dict:
  """This process's share of the batch -> global arrays laid out by `shardings` (extra host
  fields, such as layout diagnostics, stay on the host), cast to the dtypes of `spec`
  (`batch_spec`) when given."""
  missing = sorted(set(shardings) - set(host))
  if missing:
    raise KeyError(f'the data pipeline\'s batch lacks {missing}')
  cast = lambda k, a: a if spec is None else a.astype(spec[k][1], copy=False)
  return {k: jax.make_array_from_process_local_data(s, cast(k, np.asarray(host[k])))
          for k, s in shardings.items()}


def _check_loss_positions(host: Mapping[str, np.ndarray], run, step: int) -> None:
  """Refuses a batch with a sequence that has more learned tokens than
  `model.llm.loss_positions` (its loss would silently lose the rest), naming the numbers."""
  k = run.model.llm.loss_positions
  if not k:
    return
  over = learned_overflow(host['labels'], k)
  if over.any():
    n = int(over.max()) + k
    raise ValueError(f'step {step + 1}: a sequence of the batch has {n} learned tokens but '
                     f'model.llm.loss_positions={k} scores only the first {k}; raise it to at '
                     f'least {n}, or set it to 0 (every position). Checkpoints up to the last '
                     'save are kept: the run resumes from there.')


def _global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves of `tree` together (in float32)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def skipped_by_reason(iterator) -> dict[str, int]:
  """The samples every process's iterator skipped, {reason: count} summed over the processes
  (every process must call this: the sum is a collective). Reads the iterator's `skipped`
  counter (none: all zero)."""
  from panda_jax.data.pipeline import SKIP_REASONS
  counts = getattr(iterator, 'skipped', None) or {}
  unknown = set(counts) - set(SKIP_REASONS)
  if unknown:
    raise ValueError(f'skip reasons {sorted(unknown)} are not in {SKIP_REASONS}')
  local = np.array([int(counts.get(r, 0)) for r in SKIP_REASONS], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    local = np.asarray(multihost_utils.process_allgather(local)).reshape(
        -1, len(SKIP_REASONS)).sum(0)
  return {r: int(c) for r, c in zip(SKIP_REASONS, local)}


def write_summary(workdir: str, step: int, last: Mapping, state, mesh, batch_size: int,
                  iterator, preempted: bool = False) -> dict:
  """`workdir/summary.json` (written by process 0; every process must call this): `step`
  reached, `loss`, `ce`, `distill` of that step (`last`, the loop's last logged metrics; from
  the previous summary of this step when this invocation ran no step, else null),
  `param_norm` (the global L2 norm of all parameters, computed on the devices from the
  sharded state), `samples_seen` (global: step x train.batch_size), `samples_skipped`
  ({reason: count} summed over all processes), `skipped_total` and `preempted` (whether SIGTERM
  stopped the run before its last step; rerun the same command to resume). Returns the summary."""
  norm = jax.jit(_global_norm, out_shardings=NamedSharding(mesh, PartitionSpec()))(
      state.params)
  skipped = skipped_by_reason(iterator)
  path = storage.join(workdir, 'summary.json')
  metrics = {k: last.get(k) for k in ('loss', 'ce', 'distill')}
  if last.get('step') != step and storage.exists(path):
    try:
      previous = storage.read_json(path)
    except (OSError, ValueError):
      previous = {}
    if previous.get('step') == step:
      metrics = {k: previous.get(k) for k in metrics}
  summary = dict(step=int(step), **metrics, param_norm=float(norm),
                 samples_seen=int(step) * int(batch_size), samples_skipped=skipped,
                 skipped_total=sum(skipped.values()), preempted=bool(preempted))
  if jax.process_index() == 0:
    storage.write_json(path, summary, indent=1, sort_keys=True)
  return summary


# Steps the loop may dispatch beyond the last one the devices finished. JAX returns from a step
# before it has run, so without a bound the loop would run ahead to the next host read (the next
# logged step): a SIGTERM then waits for every step dispatched since, up to `train.log_every`
# steps, before the checkpoint, which a preemption notice's grace period may not hold. Two
# keep the next step queued while the host prepares the one after.
MAX_STEPS_AHEAD = 2


class _Inflight:
  """The last dispatched steps' results: `add` blocks until at most `limit` are unfinished."""

  def __init__(self, limit: int = MAX_STEPS_AHEAD):
    if limit < 1:
      raise ValueError(f'limit={limit} must be at least 1')
    self.limit = limit
    self._pending: collections.deque = collections.deque()

  def add(self, result: jax.Array) -> None:
    self._pending.append(result)
    while len(self._pending) > self.limit:
      self._pending.popleft().block_until_ready()


class _Preemption:
  """SIGTERM (a TPU or spot VM's preemption notice, `scancel`, `tpu_vm.sh stop`) turned into
  one stop that every process takes after the same step: `reached` is asked after every step.

  With `jax.distributed` (`--multihost`, even on one process) JAX's preemption service decides:
  its handler, installed by `jax.distributed.initialize`, tells the coordination service of a
  SIGTERM on any process, which then sets the stop one step after the furthest process's
  current one, and `multihost_utils.reached_preemption_sync_point` says when that step is
  reached. Between notices a call is a local lookup (no collective, no host round trip). One
  process without it: a Python SIGTERM handler sets a flag, read after each step.
  """

  def __init__(self):
    self.requested = False
    self.stopped = False
    self._old = None
    self._agreed = False

  def __enter__(self):
    from jax._src import distributed as jax_distributed
    state = jax_distributed.global_state
    if state.client is not None:
      # Its SIGTERM handler must stay: a Python one would replace it (and stop one process).
      self._agreed = state.preemption_sync_manager is not None
      if not self._agreed:
        logging.warning('jax_enable_preemption_service is off: SIGTERM will end the processes '
                        'without a checkpoint')
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint after this step and stopping')
    self.requested = True

  def reached(self, step: int, final: bool) -> bool:
    """Whether to stop after `step` (saving it). Asked on every process at the step the loop
    starts from and after every step: the agreement takes the furthest step any process was
    asked about (Orbax's `CheckpointManager.save` asks too, with the same steps). `final`: the
    run's last step (a stop there is no preemption).

    A SIGTERM to a resumed run before its first ask (while it restores and compiles) is heard
    by no step: the run goes on until it is killed, and resumes from its last checkpoint."""
    if self._agreed:
      from jax.experimental import multihost_utils
      hit = multihost_utils.reached_preemption_sync_point(step)
    else:
      hit = self.requested
    self.stopped = hit and not final
    return self.stopped

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def create_state(config, run: config_lib.Run, mesh, model, rng):
  """Parameters born sharded, optional initialisation from other runs, optimizer state.

  Returns (state, state shardings, labels, tx, schedules).
  """
  # Parameter shapes do not depend on the batch: initialise with one sample (the model takes
  # teacher features, which the online teacher computes from the teacher frames in the step).
  zeros = run.batch.zeros(1)
  if zeros.pop('teacher_pixels', None) is not None:
    tc = run.teacher
    zeros['teacher'] = np.zeros((1, zeros['pixels'].shape[1], tc.grid ** 2, tc.hidden),
                                np.float32)
  init_rng, state_rng = jax.random.split(rng)
  variables, var_sh = sharding.init_sharded(model.init, mesh, init_rng, zeros,
                                            rules=run.rules)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  init = config.init
  if init.from_run:
    params, batch_stats, _ = ckpt.load_params(init.from_run, params, batch_stats,
                                              require=init.require, skip=init.skip)
  if init.converted:         # each process reads only the shards of its devices
    params, batch_stats, _ = ckpt.load_converted_params(
        init.converted, params, batch_stats, require=init.require, skip=init.skip)
  labels = param_labels(flatten(params).keys(), config.optim)
  low = frozen_dtype(config.optim)
  if low is not None:         # frozen weights kept in a lower precision (a LoRA run's base)
    params = jax.jit(lambda p: cast_frozen(p, labels, low), out_shardings=var_sh['params'],
                     donate_argnums=0)(params)
  tx, schedules = make_optimizer(labels, config.optim, config.train.steps)
  train, _ = trainable_tree(params, labels)
  train_sh, _ = trainable_tree(var_sh['params'], labels)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = state_shardings(tx, jax.eval_shape(tx.init, train), train_sh, replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(train)
  # Every leaf placed by its sharding: the step's outputs carry the mesh in their types, so an
  # input without it (a bare jnp.zeros step) would make the second step compile again.
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                     batch_stats=batch_stats, opt_state=opt_state,
                     rng=jax.device_put(state_rng, replicated),
                     refused=jax.device_put(jnp.zeros((), jnp.int32), replicated))
  state_sh = TrainState(step=replicated, params=var_sh['params'],
                        batch_stats=var_sh.get('batch_stats', {}), opt_state=opt_sh,
                        rng=replicated, refused=replicated)
  return state, state_sh, labels, tx, schedules


# The jitted train steps of this process's recent `train` calls, by everything their program is
# built from: a later call with the same model, optimizer, schedule, trainable set, teacher and
# shardings (a notebook rerunning a stage, the test suite, stages that train alike) reuses the
# step, so it is traced, lowered and compiled once instead of on every call.
_STEP_CACHE: collections.OrderedDict = collections.OrderedDict()
STEP_CACHE_SIZE = 2


def _step_key(config, run: config_lib.Run, mesh, labels, state_sh, batch_sh, teacher_sh):
  """Everything `train` builds its jitted step from (a hashable tuple)."""
  def shardings(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)
  return (run.model, run.teacher if run.online_teacher else None, str(run.dtype),
          str(run.param_dtype), run.rules, mesh, tuple(sorted(labels.items())),
          config.optim.to_json(sort_keys=True), int(config.train.steps),
          int(config.train.accum_steps), shardings(state_sh), shardings(batch_sh),
          shardings(teacher_sh))


def _cached_step(key, build):
  """The step cached under `key`, or `build()` cached (the least recently used dropped)."""
  fn = _STEP_CACHE.pop(key, None)
  if fn is None:
    fn = build()
  _STEP_CACHE[key] = fn
  while len(_STEP_CACHE) > STEP_CACHE_SIZE:
    _STEP_CACHE.popitem(last=False)
  return fn


def resolve_steps(config, iterator) -> int:
  """`train.steps`, or one epoch of the iterator's data set when it is -1.

  One epoch is counted in annotation records (whole global batches of the data set, the same
  on every process), before any sample is skipped: with broken videos in the data the run sees
  that many batches, so some good samples come round a second time. Run `panda_jax.data.check` first and set
  `train.steps` from its good-sample count where that matters.
  """
  if config.train.steps > 0:
    return config.train.steps
  per_epoch = getattr(iterator, 'steps_per_epoch', None)
  if not per_epoch:
    raise ValueError('train.steps=-1 (one epoch) needs a data set of known size; set '
                     '--config.train.steps')
  return global_steps(int(per_epoch))


def global_steps(local: int, gather=None) -> int:
  """One epoch in steps on every process: the smallest of the processes' own counts.

  Every process must run the same number of steps (each is a collective). The training
  pipeline counts whole global batches, the same on every process; an iterator whose
  processes count differently (a per-host shard of its own) gets the minimum.
  """
  if gather is None:
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    gather = multihost_utils.process_allgather
  counts = np.asarray(gather(np.asarray(local, np.int64))).reshape(-1)
  if counts.min() != counts.max():
    logging.info('one epoch = %d steps (per-process counts %s)', counts.min(), counts.tolist())
  return int(counts.min())


@dataclasses.dataclass
class Setup:
  """What a training run computes with, built once by `setup` from its config: the mesh, the
  initial state (born sharded) and its shardings, the parameter labels, the batch shardings,
  the teacher's parameters (empty without an online teacher) and the jitted step."""
  run: config_lib.Run
  mesh: Any
  state: TrainState
  state_sh: TrainState
  labels: Mapping[str, str]
  batch_sh: Mapping[str, NamedSharding]
  teacher_params: Any
  step_fn: Callable


def setup(config, run: config_lib.Run) -> Setup:
  """The mesh, the born-sharded state, the online teacher and the jitted step (from the cache
  of this process's recent runs when they built the same one: `_cached_step`)."""
  mesh = sharding.make_mesh(run.mesh)
  shards = sharding.batch_shards(mesh, run.rules)
  if config.train.batch_size % (shards * config.train.accum_steps):
    raise ValueError(f'train.batch_size={config.train.batch_size} must be a multiple of the '
                     f'batch-sharded mesh axes {" x ".join(sharding.batch_axes(run.rules))} = '
                     f'{shards} times train.accum_steps={config.train.accum_steps}')
  model = VideoPanda(run.model, dtype=run.dtype, param_dtype=run.param_dtype)
  state, state_sh, labels, tx, schedules = create_state(
      config, run, mesh, model, jax.random.PRNGKey(config.seed))
  n_train = sum(int(np.prod(v.shape)) for k, v in flatten(state.params).items()
                if labels[k] != 'frozen')
  logging.info('%d trainable of %d parameters', n_train,
               sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state.params)))

  batch_sh = {k: sharding.batch_sharding(mesh, len(s), run.rules)
              for k, (s, _) in run.batch.items()}
  if run.online_teacher:
    teacher, teacher_params, teacher_sh = create_teacher(
        run, mesh, config.seed, config.data.frames, config.init.teacher,
        config.init.teacher_prefix)
  else:
    teacher, teacher_params, teacher_sh = None, {}, {}
  step_fn = _cached_step(
      _step_key(config, run, mesh, labels, state_sh, batch_sh, teacher_sh),
      lambda: jax.jit(
          make_train_step(model, labels, tx, schedules, config.train.accum_steps,
                          run.model.distill_weight, teacher=teacher),
          in_shardings=(state_sh, batch_sh, teacher_sh), out_shardings=(state_sh, None),
          donate_argnums=(0,)))
  return Setup(run=run, mesh=mesh, state=state, state_sh=state_sh, labels=labels,
               batch_sh=batch_sh, teacher_params=teacher_params, step_fn=step_fn)


def resume(mngr, state, state_sh, iterator) -> tuple[TrainState, int]:
  """(state, step) of the newest complete checkpoint in `mngr`, with this process's data
  state set on `iterator`; (state, 0) as given when there is none."""
  start = mngr.latest_step() or 0
  if start:
    state, saved = ckpt.restore(mngr, start, state, state_sh)
    # This process's data state; saved by another process count, the iterator maps them
    # (`TrainIterator.state_from`) or says why not.
    iterator.set_state(ckpt.process_data_state(saved, jax.process_index(), jax.process_count(),
                                               getattr(iterator, 'state_from', None)))
    logging.info('resumed from step %d', start)
  return state, start


class _Reporter:
  """The loop's outputs besides checkpoints: TensorBoard scalars and the log through `writer`,
  `metrics.jsonl` and the progress bar (process 0), with rates and ETAs counted from the end of
  the first step of this invocation (which compiles)."""

  def __init__(self, workdir: str, start: int, total: int, progress: bool, desc: str):
    from tqdm import tqdm
    lead = jax.process_index() == 0
    self.writer = metrics_lib.create_writer(workdir, just_logging=not lead)
    self.total = total
    self.t0, self.s0 = None, start
    self.bar = tqdm(total=total, initial=start, desc=desc, unit='step', dynamic_ncols=True,
                    disable=not (progress and lead), file=sys.stderr)
    self.metrics_log = storage.LineLog(storage.join(workdir, 'metrics.jsonl')) if lead else None
    self.last: dict = {}

  def stepped(self, step: int, metrics) -> None:
    """After each step: the bar moves; the clock starts once the first step has finished."""
    self.bar.update(1)
    if self.t0 is None:
      jax.block_until_ready(metrics)
      self.t0, self.s0 = time.perf_counter(), step

  def log(self, step: int, metrics, iterator) -> None:
    """Writes the step's scalars everywhere and keeps them as `last` (with `first_loss`)."""
    import json
    m = jax.device_get(metrics)
    dt = time.perf_counter() - self.t0
    rate = (step - self.s0) / dt if step > self.s0 and dt > 0 else 0.0
    scalars = {k: float(v) for k, v in m.items() if k not in ('finite', 'refused')}
    scalars['refused_steps'] = float(m['refused'])
    scalars['steps_per_s'] = rate
    scalars['tokens_per_s'] = rate * float(m['tokens'])
    for k, v in getattr(iterator, 'stats', lambda: {})().items():
      scalars[f'data/{k}'] = float(v)
    self.writer.write_scalars(step, scalars)
    eta = f'ETA {(self.total - step) / rate:.0f}s' if rate > 0 else 'ETA after the next log'
    logging.info('step %d/%d loss %.4f (ce %.4f, distill %.4f) %.2f steps/s, %s',
                 step, self.total, scalars['loss'], scalars['ce'], scalars['distill'], rate, eta)
    self.bar.set_postfix(loss=f'{scalars["loss"]:.3f}', ce=f'{scalars["ce"]:.3f}',
                         refresh=False)
    if self.metrics_log is not None:
      self.metrics_log.append(json.dumps(dict(scalars, step=step)))
    self.last = dict(scalars, step=step,
                     first_loss=self.last.get('first_loss', scalars['loss']))

  def flush(self) -> None:
    if self.metrics_log is not None:
      self.metrics_log.flush()     # a bucket's metrics.jsonl: durable up to every checkpoint

  def close(self) -> None:
    self.writer.close()
    self.bar.close()
    if self.metrics_log is not None:
      self.metrics_log.close()


def _check_refused(metrics, step: int, max_refused: int, last: Mapping, mngr) -> None:
  """Raises NonFiniteError once more than `max_refused` steps were refused (read from the
  device: the only host read of the step's results on a saving step that is not logged)."""
  refused = int(jax.device_get(metrics['refused']))
  if refused > max_refused:
    mngr.wait_until_finished()
    raise NonFiniteError(
        f'{refused} steps refused by step {step} (a non-finite loss, gradient or '
        f'BatchNorm statistic; the last logged loss {last.get("loss")}, this step\'s '
        f'{float(metrics["loss"])}), more than train.max_refused_steps={max_refused}; '
        f'the newest checkpoint (step {mngr.latest_step()}) is kept')


def _save(mngr, step: int, state, iterator, reporter: _Reporter) -> None:
  """Saves checkpoint `step` (asynchronously) after checking the state is finite."""
  if not bool(_all_finite(state)):
    mngr.wait_until_finished()
    raise NonFiniteError(
        f'the train state at step {step} holds a non-finite value although no update '
        f'with one was applied (an overflow in the optimizer?); not saved, the newest '
        f'checkpoint (step {mngr.latest_step()}) is kept')
  reporter.flush()
  ckpt.save(mngr, step, state, iterator.get_state())


def train(config, workdir: str, iterator: Iterator, progress: bool = False,
          desc: str = 'train', run: config_lib.Run | None = None) -> dict:
  """Runs (or resumes) the configured stage. Returns the last logged metrics (with
  `first_loss`, the loss at this invocation's first logged step).

  At the end (the last step, or the step reached when SIGTERM stopped it) process 0 writes
  `workdir/summary.json` (`write_summary`); every process takes part in computing it.

  Every logged step also appends its scalars to `workdir/metrics.jsonl` (one JSON object per
  line with `step`). `progress` shows a progress bar (`desc`) on process 0; its ETA, like the
  logged one, is measured from the steps after the first, so compilation does not inflate it.
  `run`: the config resolved by the caller (resolved here when not given).
  """
  steps = resolve_steps(config, iterator)
  if steps != config.train.steps:
    with config.unlocked() if hasattr(config, 'unlocked') else contextlib.nullcontext():
      config.train.steps = steps
  job = setup(config, run or config_lib.resolve(config))
  mngr = ckpt.manager(workdir, config.train.save_every, config.train.keep)
  state, start = resume(mngr, job.state, job.state_sh, iterator)
  total = config.train.steps
  reporter = _Reporter(workdir, start, total, progress, desc)
  step = start
  try:
    with _Preemption() as pre, jax.set_mesh(job.mesh), nn.logical_axis_rules(job.run.rules):
      # Asked at the step it starts from too: the agreement then never picks one behind it.
      stop = pre.reached(step, final=step >= total)
      inflight = _Inflight()
      while step < total and not stop:
        host = next(iterator)
        _check_loss_positions(host, job.run, step)
        state, metrics = job.step_fn(state, _global_batch(host, job.batch_sh, job.run.batch),
                                     job.teacher_params)
        inflight.add(metrics['loss'])
        step += 1
        stop = pre.reached(step, final=step == total)
        reporter.stepped(step, metrics)
        is_log = step % config.train.log_every == 0 or step == total
        is_save = step % config.train.save_every == 0 or step == total or stop
        if is_log or is_save:
          # The only host reads of the step's results, and only on these steps: refused steps
          # are counted on the device (`state.refused`), so none is missed in between.
          _check_refused(metrics, step, config.train.max_refused_steps, reporter.last, mngr)
        if is_log or stop:
          reporter.log(step, metrics, iterator)
        if is_save:
          _save(mngr, step, state, iterator, reporter)
        if stop:
          logging.warning('preempted: every process stops after step %d of %d, saved', step,
                          total)
          break
  finally:
    # Whatever stops the loop, a save in flight completes (only SIGKILL loses it).
    mngr.wait_until_finished()
    reporter.close()
  write_summary(workdir, step, reporter.last, state, job.mesh, config.train.batch_size,
                iterator, preempted=pre.stopped)
  return reporter.last
