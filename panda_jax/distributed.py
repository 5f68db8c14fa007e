"""Joining several JAX processes (`--multihost`), shared by every entry point that can run on
many hosts: `panda_jax.main`, `panda_jax.eval.videoqa`, `panda_jax.teacher.extract`."""

from __future__ import annotations

import jax
from absl import app, flags


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
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
