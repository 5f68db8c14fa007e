"""Settings of the host process that the entry point applies before any work.

`keep_freed_memory`: glibc's malloc serves a request of 128 KiB or more (the threshold then
adapts, up to 32 MiB) with a fresh `mmap` and gives it back to the kernel on `free`. A training
step on XLA:CPU allocates and frees its buffers every step, and the host pipeline does the
same with every decoded clip, so every step touched fresh pages again: in the demo's stage 3
on a 2-core machine that was about 100,000 page faults a second and 30 % of the CPU time in the
kernel. Serving requests up to glibc's ceiling (32 MiB) from the heap and not trimming it
keeps those pages: the same run then took under 200 faults a second and almost no kernel
time (`benchmarks/cpu_train.py` measures the steps per second). The cost is that the process
keeps the memory of its largest step instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

# mallopt(3) parameters (malloc.h) and glibc's ceiling for the mmap threshold on 64-bit hosts
# (DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long)).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX,
                      trim_threshold: int = TRIM_THRESHOLD) -> bool:
  """Asks glibc's malloc to serve requests below `mmap_threshold` bytes from its heap and to
  return freed memory to the kernel only when more than `trim_threshold` bytes are free at its
  top. Returns True if applied; False where the C library is not glibc (nothing changes)."""
  if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
    raise ValueError(f'mmap_threshold={mmap_threshold}: expected 1 .. {MMAP_THRESHOLD_MAX} '
                     '(glibc ignores larger values)')
  if trim_threshold <= 0:
    raise ValueError(f'trim_threshold={trim_threshold} must be positive')
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
  except (OSError, AttributeError, TypeError):
    logging.info('keep_freed_memory: %s is not glibc; malloc left as it is', name)
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  # Setting the trim threshold too, as mallopt(3) says, fixes both (no dynamic adjustment).
  ok = (mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and
        mallopt(M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1))) == 1)
  return ok
