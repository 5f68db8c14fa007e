"""Peak host memory of restoring a converted model: whole host trees vs. sharded restore.

  python benchmarks/restore_memory.py [--size_mb=640] [--chunk_mb=32] [--dir=/tmp/restore_memory]

Writes a converted plain-llama checkpoint (the layout `panda_jax.convert.checkpoint` writes:
host arrays saved by `ocp.StandardCheckpointer` under `variables/`, `panda_config.json` beside)
of random float32 weights, about `size_mb` MB, twice: each array one storage chunk (as
`convert_directory` writes today) and in chunks of at most `chunk_mb` MB (`ocp.SaveArgs(
chunk_byte_size=...)`); then restores each in fresh processes, each time
into the same target: every weight sharded along its largest dimension over all devices of a
1-D 'fsdp' mesh, as `sharding.init_sharded` places FSDP parameters.

  old:     `load_converted` (every array whole in host memory) + `merge_matching`
           (device_put of each array into its sharding): what `create_state` did.
  sharded: `load_converted_params` (`restore_matching`): only the taken variables, restored
           by Orbax straight into the target shardings; each process reads its shards.

Both run as 1 process x 8 CPU devices and as 2 processes x 4 (jax.distributed over loopback,
gloo). Each process reports its peak RSS (VmHWM, reset just before the restore through
/proc/self/clear_refs) minus its RSS just before the restore;
on the CPU backend device buffers are host memory too, so the restored shards themselves are
counted: a process of 2 x 4 should need about half the model, one of 1 x 8 about all of it.
The target trees are abstract (`jax.ShapeDtypeStruct` with shardings), so no initialised
parameters sit in the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def llama_shapes(size_mb: float) -> tuple[dict, dict]:
  """(LlamaConfig fields, {path: shape}) of a scanned llama decoder of about `size_mb` MB in
  float32: a 1024-wide model with as many layers as the size asks (at least one)."""
  vocab, hidden, heads, head_dim, mlp = 32000, 1024, 8, 128, 2816
  per_layer = 4 * hidden * heads * head_dim + 3 * hidden * mlp + 2 * hidden
  fixed = 2 * vocab * hidden + hidden
  layers = max(1, round((size_mb * 1e6 / 4 - fixed) / per_layer))
  cfg = dict(vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=heads,
             head_dim=head_dim, mlp=mlp)
  L = layers
  shapes = {
      'embed/embedding': (vocab, hidden),
      'layers/attn/q/kernel': (L, hidden, heads, head_dim),
      'layers/attn/k/kernel': (L, hidden, heads, head_dim),
      'layers/attn/v/kernel': (L, hidden, heads, head_dim),
      'layers/attn/o/kernel': (L, heads, head_dim, hidden),
      'layers/mlp/gate/kernel': (L, hidden, mlp),
      'layers/mlp/up/kernel': (L, hidden, mlp),
      'layers/mlp/down/kernel': (L, mlp, hidden),
      'layers/attn_norm/scale': (L, hidden),
      'layers/mlp_norm/scale': (L, hidden),
      'norm/scale': (hidden,),
      'lm_head/kernel': (hidden, vocab),
  }
  return cfg, shapes


def write(directory: str, size_mb: float, chunk_mb: float = 0) -> float:
  """Writes the converted checkpoint, each array one storage chunk as `convert_directory`
  writes it, or chunks of at most `chunk_mb` MB; -> its size in MB (float32 bytes)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from panda_jax import storage
  from panda_jax.convert.checkpoint import CONFIG_FILE, config_to_json
  from panda_jax.models.llama import LlamaConfig
  from panda_jax.tree import unflatten
  cfg, shapes = llama_shapes(size_mb)
  rng = np.random.default_rng(0)
  flat = {k: rng.random(s, dtype=np.float32) for k, s in shapes.items()}
  ckptr = ocp.StandardCheckpointer()
  tree = {'params': unflatten(flat)}
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(
      chunk_byte_size=int(chunk_mb * 1e6) if chunk_mb else None), tree)
  ckptr.save(storage.path(directory) / 'variables', tree, save_args=save_args)
  ckptr.wait_until_finished()
  storage.write_json(storage.path(directory) / CONFIG_FILE,
                     config_to_json('llama', LlamaConfig(**cfg)), indent=2)
  return sum(a.nbytes for a in flat.values()) / 1e6


def _status_mb(field: str) -> float:
  """A memory field of /proc/self/status (VmRSS, VmHWM: the peak RSS) in MB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024 / 1e6
  raise KeyError(f'{field} not in /proc/self/status')


def _reset_peak() -> bool:
  """Resets this process's peak RSS (VmHWM) to its RSS now; False where the kernel refuses."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def child(directory: str, mode: str, size_mb: float, coordinator: str | None,
          processes: int, process_id: int) -> None:
  """One process of one measurement: prints a JSON line with its peak RSS increase."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  if processes > 1:
    from panda_jax import distributed
    distributed.initialize(coordinator, processes, process_id)
  from panda_jax.train import checkpoint as ckpt
  from panda_jax.tree import unflatten
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ('fsdp',))

  def sharding(shape):
    big = max(range(len(shape)), key=lambda i: (shape[i] % len(devices) == 0, shape[i]))
    spec = [None] * len(shape)
    if shape[big] % len(devices) == 0:
      spec[big] = 'fsdp'
    return NamedSharding(mesh, P(*spec))
  _, shapes = llama_shapes(size_mb)
  ours = {'llm': unflatten({k: jax.ShapeDtypeStruct(s, jax.numpy.float32,
                                                     sharding=sharding(s))
                            for k, s in shapes.items()})}
  # The peak is VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would report the
  # peak of the parent that forked it (here the writer of the checkpoint).
  reset = _reset_peak()
  before = _status_mb('VmRSS')
  t0 = time.perf_counter()
  if mode == 'old':
    from panda_jax.convert.checkpoint import load_converted
    _, _, conv = load_converted(directory)
    params, _, report = ckpt.merge_matching(ours, {}, {'llm': conv['params']}, {},
                                            require=['.'])
  else:
    params, _, report = ckpt.load_converted_params(directory, ours, {}, require=['.'])
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  peak = _status_mb('VmHWM')
  held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
  print(json.dumps({'mode': mode, 'processes': processes, 'process': process_id,
                    'devices': jax.local_device_count(), 'loaded': len(report['loaded']),
                    'before_mb': before, 'peak_delta_mb': peak - before, 'reset': reset,
                    'held_mb': held / 1e6, 'seconds': seconds}), flush=True)
  if processes > 1:     # leave together: a process whose coordinator is gone aborts
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('restore_memory done')
    jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def measure(directory: str, mode: str, size_mb: float, processes: int) -> list[dict]:
  """Runs one measurement in `processes` fresh processes of 8 / processes devices each."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={8 // processes}')
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), '--child', mode, f'--dir={directory}',
       f'--size_mb={size_mb}', f'--coordinator={coordinator}', f'--processes={processes}',
       f'--process_id={i}'], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(processes)]
  rows = []
  for i, p in enumerate(procs):
    out, err = p.communicate(timeout=1800)
    if p.returncode != 0:
      raise RuntimeError(f'{mode} on {processes} processes: process {i} exited with '
                         f'{p.returncode}:\n{err[-3000:]}')
    rows.append(json.loads([l for l in out.splitlines() if l.startswith('{')][-1]))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size_mb', type=float, default=640)
  ap.add_argument('--dir', default='/tmp/restore_memory')
  ap.add_argument('--chunk_mb', type=float, default=32,
                  help='Storage chunk size of the second layout measured.')
  ap.add_argument('--child', choices=['old', 'sharded'])
  ap.add_argument('--coordinator')
  ap.add_argument('--processes', type=int, default=1)
  ap.add_argument('--process_id', type=int, default=0)
  a = ap.parse_args()
  if a.child:
    child(a.dir, a.child, a.size_mb, a.coordinator, a.processes, a.process_id)
    return
  print(f'{"checkpoint layout":<22}{"processes":<12}{"process":>8}{"old MB":>9}'
        f'{"sharded MB":>12}{"ratio":>7}{"held MB":>9}{"old s":>7}{"sharded s":>11}')
  for chunk_mb in (0, a.chunk_mb):
    directory = os.path.join(a.dir, f'chunk{chunk_mb:g}')
    if os.path.exists(os.path.join(directory, 'variables')):
      raise SystemExit(f'{directory} already holds a checkpoint: give an empty --dir')
    mb = write(directory, a.size_mb, chunk_mb)
    layout = f'chunks <= {chunk_mb:g} MB' if chunk_mb else 'one chunk per array'
    for processes in (1, 2):
      old = measure(directory, 'old', a.size_mb, processes)
      new = measure(directory, 'sharded', a.size_mb, processes)
      for o, n in zip(old, new):
        print(f'{layout:<22}{f"{processes} x {8 // processes} dev":<12}{o["process"]:>8}'
              f'{o["peak_delta_mb"]:>9,.0f}{n["peak_delta_mb"]:>12,.0f}'
              f'{n["peak_delta_mb"] / o["peak_delta_mb"]:>7.2f}{n["held_mb"]:>9,.0f}'
              f'{o["seconds"]:>7.1f}{n["seconds"]:>11.1f}', flush=True)
  print(f'model: {mb:,.0f} MB of float32 (a scanned llama, converted layout). MB: peak RSS of '
        'the process minus its RSS just before the restore; held MB: bytes of the restored '
        "shards on the process's devices (host memory on CPU); ratio: sharded / old; "
        "one chunk per array: as convert_directory writes today")


if __name__ == '__main__':
  main()
