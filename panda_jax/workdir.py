"""A training run's workdir, read only: its newest checkpoint's step and variables.

Below `train` (which writes workdirs, `train.checkpoint`) and `eval` (which answers from them),
so evaluation reads a run without importing training. The layout: `checkpoints/<step>/` with
one Orbax item per name of ITEMS; the workdir may be local or `gs://` (`panda_jax.storage`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from panda_jax import storage

# The items of a training checkpoint (`train.checkpoint.save`).
ITEMS = ('params', 'batch_stats', 'opt_state', 'meta', 'data')


def latest_step(workdir) -> int | None:
  path = storage.path(workdir) / 'checkpoints'
  if not storage.exists(path):
    return None
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=ITEMS).latest_step()


def restore_variables(workdir) -> tuple[int, Any, Any]:
  """(step, params, batch_stats) of a run's newest checkpoint, as saved (host arrays)."""
  step = latest_step(workdir)
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {storage.join(workdir, "checkpoints")}')
  path = storage.path(workdir) / 'checkpoints' / str(step)
  # No item for a model without BatchNorm statistics (see `save`).
  stats = _host_tree(path / 'batch_stats') if storage.exists(path / 'batch_stats') else {}
  return step, _host_tree(path / 'params'), stats


def _host_tree(path):
  """A saved item as numpy arrays, whatever devices and processes saved it (restoring into
  the saved shardings fails on another topology, e.g. evaluating on 2 processes x 1 device
  the checkpoint of 2 x 4)."""
  ck = ocp.PyTreeCheckpointer()
  meta = ck.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  meta = getattr(meta, 'tree', meta)
  return ck.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
