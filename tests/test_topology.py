"""The same training whatever the topology: each process reads its slice of every global batch,
so 1 process and N processes see the same global batches (the pipeline alone, fast), and a
tiny stage-2 run as 1 process x 8 devices and as 2 processes x 4 devices (launch/local.sh)
logs the same losses, ends with the same parameters and writes the same summary (slow)."""

import collections
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from panda_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------
# The index mapping (no JAX processes)

def _stream(n, batch, seed, index, count, steps):
  """Record indices process `index` of `count` reads for `steps` global batches."""
  ds = pipeline.ProcessSlices(pipeline.global_stream(range(n), seed), batch, index, count)
  return [ds[j] for j in range(steps * batch // count)]


@pytest.mark.parametrize('n, batch', [(13, 4), (16, 8), (7, 6)])
def test_n_processes_read_the_slices_of_the_one_process_batches(n, batch):
  steps = 3 * n // batch + 2                    # several epochs, batches across their ends
  one = _stream(n, batch, 3, 0, 1, steps)
  # One process: exactly the stream it read before processes took slices (the per-process
  # shard [0::1], shuffled, repeated).
  old = grain.MapDataset.source(list(range(n)))[0::1].shuffle(seed=3).repeat()
  assert one == [old[i] for i in range(len(one))]
  # Every epoch is a permutation of all records.
  assert all(sorted(one[e * n:(e + 1) * n]) == list(range(n)) for e in range(len(one) // n))
  for count in (2, batch // 2, batch):
    if batch % count:
      continue
    local = batch // count
    parts = [_stream(n, batch, 3, i, count, steps) for i in range(count)]
    for k in range(steps):
      assembled = sum((p[k * local:(k + 1) * local] for p in parts), [])
      assert assembled == one[k * batch:(k + 1) * batch], (count, k)


def test_slices_reject_a_batch_the_processes_cannot_share():
  with pytest.raises(ValueError, match='not a multiple of the 3 processes'):
    pipeline.ProcessSlices(pipeline.global_stream(range(8), 0), 8, 0, 3)


class _Ids:
  """A stand-in for ProcessSample: a record is its own sample; records in `bad` are skipped."""
  stab, max_len = None, 0

  def __init__(self, bad=()):
    self.bad = set(bad)

  def __call__(self, record):
    if record in self.bad:
      return {'skip': 'bad_video', 'path': str(record)}
    return {'id': record}


@pytest.fixture
def ids_batches(monkeypatch):
  """TrainIterator batches as the lists of record ids they hold."""
  monkeypatch.setattr(pipeline, 'collate', lambda samples, stab, max_len: [s['id'] for s in
                                                                             samples])


def _iterators(n, batch, count, proc, seed=1):
  return [pipeline.TrainIterator(list(range(n)), proc, batch, seed=seed, process_index=i,
                                 process_count=count) for i in range(count)]


def test_train_iterators_of_n_processes_assemble_the_one_process_batches(ids_batches):
  n, batch, steps = 21, 8, 9
  (one,) = _iterators(n, batch, 1, _Ids())
  want = [next(one) for _ in range(steps)]
  for count in (2, 4):
    its = _iterators(n, batch, count, _Ids())
    assert {it.steps_per_epoch for it in its} == {one.steps_per_epoch} == {n // batch}
    got = [sum((next(it) for it in its), []) for _ in range(steps)]
    assert got == want, count


def test_a_process_resumes_its_slices_mid_epoch(ids_batches):
  n, batch, count = 21, 8, 2
  proc = _Ids(bad={3, 11})
  a = _iterators(n, batch, count, proc)[1]
  for _ in range(2):
    next(a)
  state = json.loads(json.dumps(a.get_state()))       # as a checkpoint stores it
  after = [next(a) for _ in range(6)]
  b = _iterators(n, batch, count, proc)[1]
  b.set_state(state)
  assert [next(b) for _ in range(6)] == after and b.skipped == a.skipped


def test_skipped_samples_are_replaced_from_the_process_own_slices(ids_batches):
  # Documented: with skips, each process fills its share from its own sub-stream, so the
  # global batches then differ from one process's (which fills from the next positions).
  n, batch = 16, 4
  order = _stream(n, batch, 1, 0, 1, 2)
  bad = order[0]                                      # the first sample of the first batch
  (one,) = _iterators(n, batch, 1, _Ids(bad={bad}))
  its = _iterators(n, batch, 2, _Ids(bad={bad}))
  assert next(one) == order[1:5]
  first = [next(it) for it in its]
  assert first[0] == [order[1], order[4]]             # its slice of global batch 1 fills in
  assert first[1] == order[2:4]
  assert its[0].skipped == collections.Counter(bad_video=1) and not its[1].skipped
