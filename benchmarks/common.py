"""Measuring helpers every benchmark uses: wall times, FLOPs and memory of compiled programs,
the machine's matmul peak, and the peak host memory of the process.

Imported as `common` (each benchmark is run as `python benchmarks/X.py`, so this directory is
on `sys.path`).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """(wall seconds, result) of one call of `fn()` (block on device results yourself)."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def time_ms(fn, *args, runs: int) -> list[float]:
  """Per-call wall times in ms of `runs` calls of `fn(*args)`, after one (compiling) warm-up
  call; each waits for the device."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return times


def median_ms(fn, *args, runs: int) -> float:
  """Median of `time_ms`."""
  return statistics.median(time_ms(fn, *args, runs=runs))


def compiled_flops(compiled) -> float | None:
  """FLOPs of a compiled executable by XLA's cost analysis (a dict, or a list of dicts summed);
  None when the backend reports none. XLA counts a loop body once, whatever its trip count."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    found = [c['flops'] for c in cost if c and 'flops' in c]
    return sum(found) if found else None
  return cost.get('flops') if cost else None


def compiled_gflop(compiled) -> float:
  """`compiled_flops` in GFLOP (0 when unknown)."""
  return (compiled_flops(compiled) or 0.0) / 1e9


def compiled_memory(compiled) -> dict:
  """Per-device bytes from `compiled.memory_analysis()` (None where the backend says nothing);
  total = argument + output + temp + code - alias (donated outputs reuse their inputs)."""
  m = compiled.memory_analysis()
  get = lambda a: None if m is None else getattr(m, a, None)
  out = {'argument': get('argument_size_in_bytes'), 'output': get('output_size_in_bytes'),
         'temp': get('temp_size_in_bytes'),
         'generated code': get('generated_code_size_in_bytes'),
         'alias': get('alias_size_in_bytes')}
  parts = [out[k] for k in ('argument', 'output', 'temp', 'generated code')]
  out['total'] = None if any(p is None for p in parts) else sum(parts) - (out['alias'] or 0)
  return out


def matmul_peak(n: int, runs: int = 5) -> float:
  """Median float32 n x n matmul throughput over `runs` runs, in GFLOP/s.

  The median, like the models' timings, so a lucky burst on either side does not skew a
  fraction of it; n = 4096 is a workload of the STAB's size (137 GFLOP).
  """
  ka, kb = jax.random.split(jax.random.PRNGKey(1))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  ms = median_ms(mm, a, b, runs=runs)
  return 2 * n ** 3 / (ms / 1e3) / 1e9


def peak_rss_gib() -> float:
  """Peak resident host memory of this process so far, in GiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
