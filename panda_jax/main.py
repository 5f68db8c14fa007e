"""panda-jax entry point.

  python -m panda_jax.main --config=configs/demo.py [--config.field=value ...] [--workdir=DIR]

The config's `mode` picks what runs:
  demo   the main job (configs/demo.py): a tiny Video-Panda trained through stages 1 -> 2 -> 3
         on synthetic clips, scored on held-out VideoQA, with report.md and figures in
         --workdir (default runs/demo); a rerun resumes.
  train  one training stage (configs/stage{1,2,3}.py) in --workdir, resuming automatically.
  stab   the STAB + projector on a generated letterboxed video (configs/stab.py): per-frame
         token counts and the forward time, with parameters born sharded over the device mesh.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from panda_jax import config as config_lib
from panda_jax import distributed
from panda_jax import sharding
from panda_jax import storage
from panda_jax.data import frames as frames_lib
from panda_jax.models.stab import VisualTokenizer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/X.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where outputs and the resolved config go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Start over in --workdir: delete the run there (its checkpoints, '
    'metrics, summary, and the demo\'s data, stages and report) instead of refusing a config '
    'that differs from the one it was started with in a field that changes results.')
distributed.define_flags()   # --multihost, --coordinator_address, --num_processes, --process_id


DEFAULT_DEMO_WORKDIR = 'runs/demo'


def run_demo(config) -> dict:
  """The main job: trains, evaluates and reports in --workdir (default runs/demo)."""
  from panda_jax.demo import run as demo_run
  workdir = _WORKDIR.value or DEFAULT_DEMO_WORKDIR
  if jax.process_count() > 1:
    raise app.UsageError('the demo runs on one process')
  result = demo_run.run(config, workdir)
  scores = result['variants'][0]['scores']
  val, test = scores['val'], scores['test']
  print(f'exact match, validation {val["exact_match"]:.3f} ({val["count"]} questions), '
        f'test {test["exact_match"]:.3f} ({test["count"]}); by type (majority answer):')
  for t in sorted(test['by_type']):
    print(f'  {t:<14} val {val["by_type"].get(t, {}).get("exact_match", float("nan")):.3f} '
          f'({val["baseline"].get(t, {}).get("accuracy", float("nan")):.3f})  '
          f'test {test["by_type"][t]["exact_match"]:.3f} '
          f'({test["baseline"][t]["accuracy"]:.3f})')
  print(f'report: {result["report"]["report"]}')
  return result


def run_stab(config) -> dict:
  """Runs the visual tokenizer on a generated clip and prints what each frame becomes."""
  cfg = config_lib.stab_config(config.model)
  rules = config_lib.rules(config)
  dtype = config_lib.dtype(config.model.dtype)
  param_dtype = config_lib.dtype(config.model.param_dtype)
  demo = config.demo
  if demo.frames <= 0 or demo.frames % cfg.frames_per_chunk:
    raise ValueError(f'demo.frames={demo.frames} must be a positive multiple of '
                     f'{cfg.frames_per_chunk}')
  if demo.width <= 0 or demo.height <= 0:
    raise ValueError(f'demo.width x demo.height = {demo.width}x{demo.height} must be positive')

  # Host: a clip with the requested aspect, already at its resized size, padded and masked.
  geom = frames_lib.frame_geometry(demo.height * 1000, demo.width * 1000, cfg.image_size,
                                   cfg.image_size // 2, cfg.patch_size)
  clip = frames_lib.moving_square(demo.frames, geom.height, geom.width, config.seed)
  pixels, mask = frames_lib.pad_and_normalise(clip, geom)
  pixels = np.broadcast_to(pixels, (demo.batch,) + pixels.shape)
  mask = np.broadcast_to(mask, (demo.batch,) + mask.shape)

  mesh = sharding.make_mesh(config.mesh.to_dict())
  model = VisualTokenizer(cfg, dtype=dtype, param_dtype=param_dtype)
  t0 = time.perf_counter()
  variables, _ = sharding.init_sharded(model.init, mesh, jax.random.PRNGKey(config.seed),
                                       jnp.zeros(pixels.shape, dtype), jnp.ones(mask.shape),
                                       rules=rules)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  logging.info('initialised %d parameters in %.1fs', n_params, time.perf_counter() - t0)

  shards = sharding.batch_shards(mesh, rules)
  if demo.batch % shards:
    raise ValueError(f'demo.batch={demo.batch} must be a multiple of the batch-sharded mesh '
                     f'axes {" x ".join(sharding.batch_axes(rules))} = {shards}')
  # Every host holds the whole (generated) batch; each device takes its slice.
  pixels, mask = (jax.make_array_from_callback(a.shape,
                                               sharding.batch_sharding(mesh, a.ndim, rules),
                                               lambda idx, a=a: a[idx])
                  for a in (pixels, mask))
  # Outputs replicated: with several processes each can then read (and print) all of them.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  forward = jax.jit(lambda v, x, m: model.apply(v, x, m), out_shardings=replicated)
  t0 = time.perf_counter()
  compiled = forward.lower(variables, pixels, mask).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(max(1, demo.runs)):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(variables, pixels, mask))
    times.append(time.perf_counter() - t0)

  lengths = np.asarray(out['length'])
  hw = np.asarray(out['patch_hw'])
  print(f'video {demo.width}:{demo.height}, {demo.frames} frames -> content '
        f'{geom.width}x{geom.height} px on a {geom.size}-px square '
        f'(padding top {geom.top}, left {geom.left})')
  print(f'STAB + projector: {n_params:,} parameters, mesh {dict(mesh.shape)}')
  print(f'{"frame":>5} {"LSD grid":>9} {"tokens":>7}')
  for i in range(demo.frames):
    print(f'{i:>5} {hw[0, i, 0]:>4} x {hw[0, i, 1]:<3} {lengths[0, i]:>7}')
  print(f'output tokens {tuple(out["tokens"].shape)} (fixed slots per frame: '
        f'{cfg.max_frame_tokens}); video sequence length {int(lengths[0].sum())}')
  print(f'compile {compile_s:.2f}s, forward median {1000 * float(np.median(times)):.1f} ms '
        f'per batch of {demo.batch}')
  return {'lengths': lengths, 'patch_hw': hw, 'tokens_shape': tuple(out['tokens'].shape)}


def run_train(config) -> dict:
  """Trains the configured stage in --workdir, resuming from its newest checkpoint."""
  from panda_jax.train.data import build_train_iterator
  from panda_jax.train.loop import train
  if not _WORKDIR.value:
    raise app.UsageError('training needs --workdir (checkpoints, metrics, resolved config)')
  run = config_lib.resolve(config)           # the one place a training config is resolved
  iterator = build_train_iterator(config, _WORKDIR.value, run)
  last = train(config, _WORKDIR.value, iterator, run=run)
  print(f'stage {config.stage}: finished at step {last.get("step")} with loss '
        f'{last.get("loss", float("nan")):.4f} (ce {last.get("ce", float("nan")):.4f}, '
        f'distill {last.get("distill", float("nan")):.4f}); skipped samples: '
        f'{iterator.stats()}')
  return last


MODES = {'demo': run_demo, 'train': run_train, 'stab': run_stab}


class _DropLibraryInfo:
  """A logging filter: INFO records from Orbax's internals (dozens per checkpoint) are dropped."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or '/orbax/' not in record.pathname


def _quiet_libraries() -> None:
  import logging as std_logging
  for handler in std_logging.getLogger().handlers + std_logging.getLogger('absl').handlers:
    handler.addFilter(_DropLibraryInfo())
  std_logging.getLogger('absl').addFilter(_DropLibraryInfo())


def main(argv):
  _quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  distributed.from_flags()
  if flags.FLAGS.multihost:
    logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/demo.py')
  if config.mode not in MODES:
    raise app.UsageError(f'config.mode={config.mode!r}; available: {sorted(MODES)}')
  workdir = _WORKDIR.value or (DEFAULT_DEMO_WORKDIR if config.mode == 'demo' else None)
  if config.mode == 'demo' and storage.is_remote(workdir):
    raise app.UsageError(f'--workdir={workdir}: the demo writes its data, runs and report on '
                         'a local disk; give a local directory (training stages take gs://)')
  if workdir:
    _record_config(config, workdir, _OVERWRITE.value)
  MODES[config.mode](config)


# What a run writes in its workdir (train and demo modes): what --overwrite deletes.
RUN_OUTPUTS = ('config.json', 'checkpoints', 'metrics.jsonl', 'summary.json',
               'events.out.tfevents.*', 'cache', 'data', 'stage*', 'eval', 'figures',
               'report.md', 'scores.json', 'ablations')


def _record_config(config, workdir: str, overwrite: bool) -> None:
  """Process 0 deletes the previous run with `overwrite`, then writes the resolved config and
  the code version, refusing a workdir whose run was started with a config that differs in a
  field that changes results (`config_lib.save_resolved`); every process waits for it."""
  if not overwrite:
    try:      # on every process: all of them refuse together
      config_lib.check_resumable(config, workdir)
    except config_lib.ConfigMismatchError as e:
      raise app.UsageError(str(e)) from None
  if jax.process_index() == 0:
    if overwrite:
      gone = storage.remove_matching(workdir, RUN_OUTPUTS)
      if gone:
        logging.warning('--overwrite: deleted %s from %s', ', '.join(gone), workdir)
    path = config_lib.save_resolved(config, workdir, code_version=_code_version(), check=False)
    logging.info('resolved config written to %s', path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('resolved config written')


def _code_version() -> str:
  """The git commit of this checkout (with '+changes' when its tracked files differ from it),
  or 'unknown' outside a git checkout."""
  import os
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(['git', '-C', root, 'rev-parse', '--short=12', 'HEAD'],
                            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return commit + ('+changes' if dirty else '')


if __name__ == '__main__':
  app.run(main)
