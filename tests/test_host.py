"""`panda_jax.host.keep_freed_memory`: glibc keeps freed buffers instead of unmapping them."""

import subprocess
import sys

import pytest

from panda_jax import host

# 50 rounds of a hundred 64 KiB arrays (6.4 MB of heap, 1,600 pages) made, filled and freed;
# prints the minor page faults they cost.
_CHURN = '''
import resource, sys
import numpy as np
if sys.argv[1] == '1':
  from panda_jax import host
  assert host.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
  chunks = [np.ones(16 << 10, np.float32) for _ in range(100)]
  del chunks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _faults(keep: bool) -> int:
  out = subprocess.run([sys.executable, '-c', _CHURN, '1' if keep else '0'], check=True,
                       capture_output=True, text=True)
  return int(out.stdout.split()[-1])


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
  if not _glibc():
    pytest.skip('not glibc')
  default, kept = _faults(False), _faults(True)
  # By default glibc gives the freed top of its heap back to the kernel (above 128 KiB), so
  # every round faults its 1,600 pages in again.
  assert default > 50 * 1600 * 0.8, default
  # Kept: the first round's pages fault once; the other 49 rounds reuse them.
  assert kept < 2.5 * 1600, kept


def test_bad_thresholds_are_refused_with_their_value():
  with pytest.raises(ValueError, match='mmap_threshold=67108864'):
    host.keep_freed_memory(mmap_threshold=64 << 20)
  with pytest.raises(ValueError, match='trim_threshold=0'):
    host.keep_freed_memory(trim_threshold=0)


def _glibc() -> bool:
  import platform
  return platform.libc_ver()[0] == 'glibc'
