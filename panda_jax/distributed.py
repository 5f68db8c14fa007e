"""Joining several JAX processes (`--multihost`), shared by every entry point that can run on
many hosts: `panda_jax.main`, `panda_jax.eval.videoqa`, `panda_jax.teacher.extract`; and
ending them together when one fails.

A process that raises reports it through JAX's coordination service and exits at once (status
1) instead of waiting in JAX's shutdown barrier for peers that are stuck in a collective with
it; every other process watches for that report and exits too (`PEER_FAILED_STATUS`), so a job
ends within seconds on any platform, with or without a supervisor (`launch/local.sh`, SLURM,
`launch/tpu_vm.sh`). A process that dies without running Python (SIGKILL, a crash) is noticed
by the service's heartbeat (`HEARTBEAT_TIMEOUT_S`), which aborts the others.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time

import jax
from absl import app, flags

# The exit status of a process stopped because another one failed (the failed one exits 1, as
# Python does on an uncaught exception): launchers report the process that failed first.
PEER_FAILED_STATUS = 3
# After this long without a heartbeat from a process (killed, crashed, its host gone) the
# coordination service declares it dead and aborts the others (JAX's default: 100 s).
HEARTBEAT_TIMEOUT_S = 30
# Coordination-service keys, one per process (+ its index): another process's failure report
# ("process I of N failed with TYPE"), or '' when this process exits normally.
_FAILED_KEY = 'panda_jax/failed/'
# How long the watcher's request for its key waits before it asks again.
_WATCH_TIMEOUT_MS = 60_000
# How long a failing process 0 keeps the coordination service (it runs in process 0) up after
# its report, so the others receive it before the service goes.
_COORDINATOR_GRACE_S = 2.0
_stopping = threading.Event()


def define_flags() -> None:
  """--multihost, --coordinator_address, --num_processes, --process_id (for entry points that
  define their flags in `__main__`)."""
  flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (TPU pods, GPU '
                    'clusters, launch/local.sh); every process runs the same command.')
  flags.DEFINE_string('coordinator_address', None, 'With --multihost: HOST:PORT of process 0 '
                      "(default: found by JAX's cluster detection: TPU metadata, SLURM, "
                      'Open MPI).')
  flags.DEFINE_integer('num_processes', None, 'With --multihost: how many processes (default: '
                       'detected).')
  flags.DEFINE_integer('process_id', None, 'With --multihost: this process, '
                       '0 .. num_processes - 1 (default: detected).')


def from_flags() -> None:
  """Joins the processes when --multihost is given (see `define_flags`); refuses the other
  three without it."""
  f = flags.FLAGS
  given = [f[name].present for name in ('coordinator_address', 'num_processes', 'process_id')]
  if not f.multihost:
    if any(given):
      raise app.UsageError('--coordinator_address, --num_processes and --process_id need '
                           '--multihost')
    return
  initialize(f.coordinator_address, f.num_processes, f.process_id)


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Joins this process to the others through `jax.distributed`: with the three values given
  (launch/local.sh, a hand-made cluster) or none of them (JAX detects TPU, SLURM, Open MPI)."""
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  missing = [k for k, v in given.items() if v is None]
  if missing and len(missing) < len(given):
    raise app.UsageError(f'{", ".join(missing)} missing: give all of --coordinator_address, '
                         '--num_processes and --process_id, or none (detected by JAX)')
  if not missing:
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isdigit():
      raise app.UsageError(f'--coordinator_address={coordinator_address!r}: expected HOST:PORT, '
                           'e.g. 127.0.0.1:12345')
    if num_processes < 1:
      raise app.UsageError(f'--num_processes={num_processes} must be at least 1')
    if not 0 <= process_id < num_processes:
      raise app.UsageError(f'--process_id={process_id} must be in 0..{num_processes - 1} '
                           f'(--num_processes={num_processes})')
  # Processes on CPU (launch/local.sh, tests) exchange collectives through gloo; the setting
  # only concerns the CPU client, so it is harmless on TPU and GPU hosts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  _end_together()


def _client():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def _end_together() -> None:
  """After `jax.distributed.initialize`: an uncaught exception in this process is reported to
  the others and ends it at once (`_report_failure`), and a report from another process ends
  this one (`_watch`)."""
  client = _client()
  me, count = jax.process_index(), jax.process_count()
  key = f'{_FAILED_KEY}{me}'
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    report = _peer_report(client, key)
    if report:                           # this error follows another process's failure
      _stop_for_peer(report, me, f' (here: {exc_type.__name__})')
    previous(exc_type, exc, tb)          # the traceback, as always
    _report_failure(client, me, count, exc_type.__name__)

  watcher = threading.Thread(target=_watch, args=(client, key, me),
                             name='panda_jax.distributed.watch', daemon=True)

  def release():
    # A normal exit ends the watcher's wait (its key set to '') and waits for it, before JAX's
    # shutdown (atexit runs last-registered first): a thread still inside the client when the
    # interpreter finalizes aborts the process.
    _stopping.set()
    try:
      client.key_value_set(key, '')
    except Exception:  # pylint: disable=broad-except
      pass                               # a report came first: the watcher has it
    watcher.join(timeout=5)

  sys.excepthook = hook
  atexit.register(release)
  watcher.start()


def _flush() -> None:
  for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()


def _report_failure(client, me: int, count: int, error: str) -> None:
  """Tells the other processes that this one failed with `error` (an exception's type name)
  and exits with status 1, skipping JAX's shutdown barrier (it would wait up to 5 minutes for
  peers that are stuck in a collective with this process)."""
  report = f'process {me} of {count} failed with {error}'
  for other in range(count):
    if other != me:
      try:
        client.key_value_set(f'{_FAILED_KEY}{other}', report)
      except Exception:  # pylint: disable=broad-except
        pass                             # it exited, or another process reported first
  logging.error('process %d of %d failed (the error above); stopping', me, count)
  _flush()
  if me == 0:
    time.sleep(_COORDINATOR_GRACE_S)
  os._exit(1)


def _peer_report(client, key: str) -> str | None:
  """Another process's failure report to this one (at `key`), if one was made."""
  try:
    return client.key_value_try_get(key) or None
  except Exception:  # pylint: disable=broad-except
    return None                          # none (or no service to ask)


def _stop_for_peer(report: str, me: int, detail: str = '') -> None:
  """Ends this process with `PEER_FAILED_STATUS` after another one's failure `report`. The
  error itself is printed once, by the process that failed."""
  logging.error('%s (its error is in its output); stopping process %d too%s', report, me,
                detail)
  _flush()
  os._exit(PEER_FAILED_STATUS)


def _watch(client, key: str, me: int) -> None:
  """Waits for another process's failure report at `key` (`_report_failure`) and then ends
  this process, whatever its main thread is doing (a collective that will never complete, most
  likely). Runs in a daemon thread until the report, or until the process exits."""
  while not _stopping.is_set():
    asked = time.monotonic()
    try:
      report = client.blocking_key_value_get(key, _WATCH_TIMEOUT_MS)
    except Exception:  # pylint: disable=broad-except
      # No report yet (the request timed out), or the service is unreachable (its heartbeat
      # decides about that): ask again.
      if time.monotonic() - asked < 1:
        time.sleep(1)
      continue
    if report and not _stopping.is_set():
      _stop_for_peer(report, me)
    return
