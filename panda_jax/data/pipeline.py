"""Grain pipeline: conversation annotations + videos -> fixed-shape training batches.

Per sample (in Grain workers): decode the video (the authors' frame rule, seeking where
keyframes allow), preprocess student and teacher frames, tokenise the conversation (`v1`
template, reference label masking) and check that the assembled sequence fits `max_len`.
A sample whose data is unusable is not an error: it comes out as a `skip` record (path and
reason: a video that cannot be decoded, a conversation that cannot be tokenised
(`text.ConversationError`), a sequence too long, missing teacher features) that the iterator
counts and logs, and the batch is filled with the next good samples, so batch shapes never
change. Anything else (a bug, a config that does not fit) propagates with its traceback. The
host then lays the batch out (`layout_batch`).

The iterator's state (Grain's position plus the skip counters) is saved with every checkpoint,
every process's; restoring it replays exactly the batches an uninterrupted run would have seen.
A checkpoint of N processes resumes on M others (`TrainIterator.state_from`) when every
process stopped at the same whole global batch (always so without skipped samples); otherwise
the processes' positions in the stream differ and only N processes can resume it.

Several processes (hosts): the global stream is one seeded permutation of all records per
epoch (Grain's `shuffle` then `repeat`, which reshuffles each epoch), the same whatever the
topology; global batch k is stream positions [k*B, (k+1)*B) for the global batch size B, and
process i of N reads positions [k*B + i*B/N, k*B + (i+1)*B/N) of it (`ProcessSlices`). So the
global batch at step k is the same whether 1 process or N assemble it, and one process sees
exactly the stream it always did. A skipped sample is replaced from the process's own
sub-stream (its slice of the next global batch, which shifts everything it reads after by
one): with skips in the data the global batches of 1 and of N processes then differ (each
still holds B good samples, and every process still skips and counts honestly).

Teacher targets: by default each sample carries the teacher's frames (`teacher_pixels`) for
the online teacher in the train step. Given a `teacher_features` directory (written by
`python -m panda_jax.teacher.extract`), it carries the cached features (`teacher`
[frames, grid * grid, hidden]) instead; a video without a features file is skipped and counted
(`missing_teacher_features`).

Too-long policy: a conversation whose assembled sequence (text + every frame's visual tokens)
exceeds `max_len` is dropped and counted (`too_long`); no text is cut, so a frame's tokens are
never split.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Mapping, Sequence

import grain
import numpy as np

from panda_jax.data import templates, text
from panda_jax.data.assembly import layout_batch
from panda_jax.data.video import (PaddedFrames, VideoDecodeError, decode_frames, finish_frames,
                                  pad_frames)
from panda_jax.models.stab import StabConfig, frame_grid, frame_layout
from panda_jax.data import teacher_features as features_lib

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.gif')
# Why `ProcessSample` (and the packed set's) may skip a sample: the fixed set the skip counters
# (and their sum over processes in the training summary) are kept for.
SKIP_REASONS = ('bad_conversation', 'bad_video', 'too_long', 'missing_teacher_features')


class DataStateError(ValueError):
  """A checkpoint's data iterator state cannot be given to this run's processes."""


class AnnotationError(ValueError):
  """The annotation file itself is malformed (fails at start, naming file, entry and field)."""


def read_json_list(path: str, what: str = 'annotation', entries: str = 'samples') -> list:
  """The JSON list in `path`; AnnotationError naming the file if unreadable or not a list."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AnnotationError(f'{path}: cannot read the {what} file: {e}') from None
  if not isinstance(data, list):
    raise AnnotationError(f'{path}: expected a JSON list of {entries}, got '
                          f'{type(data).__name__}')
  return data


def load_annotations(path: str) -> list[dict]:
  """Reads and validates a training conversation file (a JSON list)."""
  data = read_json_list(path)
  for i, entry in enumerate(data):
    where = f'{path}: entry {i}'
    if not isinstance(entry, dict):
      raise AnnotationError(f'{where}: expected an object, got {type(entry).__name__}')
    if not isinstance(entry.get('video'), str) or not entry['video']:
      raise AnnotationError(f'{where} (id {entry.get("id")!r}): field "video" must be a '
                            'non-empty relative path')
    conv = entry.get('conversations')
    if not isinstance(conv, list) or not conv:
      raise AnnotationError(f'{where} (id {entry.get("id")!r}): field "conversations" must '
                            'be a non-empty list')
    for j, m in enumerate(conv):
      if not isinstance(m, dict) or m.get('from') not in ('human', 'gpt') or \
          not isinstance(m.get('value'), str):
        raise AnnotationError(f'{where} (id {entry.get("id")!r}): conversations[{j}] must be '
                              '{"from": "human"|"gpt", "value": str}')
  return data


class _Pending:
  """A clip one reader thread is making for `VideoCache.get_or_make`."""

  def __init__(self):
    self.done = threading.Event()
    self.item = None


class VideoCache:
  """Clips already decoded and padded (`video.PaddedFrames`, 8-bit), by file, least recently
  used first out once they hold more than `capacity_mb`; safe across Grain's reader threads.

  A file is known by its path, size and modification time, and the preprocessing by its sizes,
  so a file rewritten under the same name is decoded again. What a hit returns was made by the
  same code from the same bytes as a miss, so training sees the same arrays either way.
  """

  def __init__(self, capacity_mb: float = 0.0):
    self._lock = threading.Lock()
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._pending: dict = {}
    self.nbytes = 0
    self.hits = self.misses = self.evictions = 0
    self.capacity_mb = 0.0
    self.resize(capacity_mb)

  def resize(self, capacity_mb: float) -> None:
    if not capacity_mb >= 0:
      raise ValueError(f'data.video_cache_mb={capacity_mb}: expected a size in MiB >= 0 '
                       '(0: no cache)')
    with self._lock:
      self.capacity_mb = float(capacity_mb)
      self._evict()

  def _evict(self) -> None:
    while self._items and self.nbytes > self.capacity_mb * 2 ** 20:
      _, old = self._items.popitem(last=False)
      self.nbytes -= old.nbytes
      self.evictions += 1

  def _hit(self, key) -> PaddedFrames | None:
    """The kept item of `key`, counted and made the most recent (the lock held), or None."""
    item = self._items.get(key)
    if item is not None:
      self._items.move_to_end(key)
      self.hits += 1
    return item

  def get(self, key) -> PaddedFrames | None:
    with self._lock:
      item = self._hit(key)
      if item is None:
        self.misses += 1
      return item

  def get_or_make(self, key, make) -> PaddedFrames:
    """The item of `key`, or `make()`'s, kept. Threads asking for a key that another thread is
    making wait for it, so a clip is decoded once however many readers want it at the same
    time. If `make` raises, the error goes to its caller, and each waiting thread makes the
    item itself (and meets its own error, as without a cache)."""
    with self._lock:
      item = self._hit(key)
      if item is not None:
        return item
      pending = self._pending.get(key)
      owner = pending is None
      if owner:
        pending = self._pending[key] = _Pending()
        self.misses += 1
    if not owner:
      pending.done.wait()
      if pending.item is None:
        with self._lock:
          self.misses += 1
        return make()
      with self._lock:
        self.hits += 1
      return pending.item
    try:
      item = make()
      self.put(key, item)
      pending.item = item
      return item
    finally:
      with self._lock:
        del self._pending[key]
      pending.done.set()

  def put(self, key, item: PaddedFrames) -> None:
    if item.nbytes > self.capacity_mb * 2 ** 20:
      return
    item.canvas.setflags(write=False)          # shared by every later hit
    item.teacher_canvas.setflags(write=False)
    with self._lock:
      if key in self._items:
        return
      self._items[key] = item
      self.nbytes += item.nbytes
      self._evict()

  def __len__(self) -> int:
    return len(self._items)

  def stats(self) -> dict:
    with self._lock:
      return {'clips': len(self._items), 'mib': self.nbytes / 2 ** 20, 'hits': self.hits,
              'misses': self.misses, 'evictions': self.evictions}


# One per process: every `ProcessSample` of this process with a `video_cache_mb` shares it, so
# a later training stage (the demo's stages run in one process) finds the clips an earlier one
# decoded. Grain worker processes (data.num_workers > 0) each have their own.
VIDEO_CACHE = VideoCache()


class ProcessSample:
  """Record -> arrays for one sample, or {'skip': reason, 'path': ...}. Picklable (workers)."""

  def __init__(self, video_root: str, tokenizer_dir: str, stab: StabConfig, frames: int,
               max_len: int, timeout_s: float = 30.0, teacher_features: str = '',
               system_prompt: str = 'videopanda_v1', video_cache_mb: float = 0.0,
               system_message: str | None = None):
    self.video_root = video_root
    self.tokenizer_dir = tokenizer_dir
    self.stab = stab
    self.frames = frames
    self.max_len = max_len
    self.timeout_s = timeout_s
    # Loaded here, once: a tokenizer that cannot load is a configuration error that must stop
    # the run at start (not a per-sample skip), and loading inside Grain's reader threads
    # races on transformers' lazy imports.
    # Its calls on one string are remembered (`text.MemoTokenizer`: most pieces of a
    # conversation repeat from sample to sample).
    # `system_prompt` names the conversation template (`templates.NAMES`: 'videopanda_v1',
    # 'vicuna_v1', 'chatml'); `system_message` replaces its system message (None: its own).
    try:
      self.template = templates.get(system_prompt, system_message)
    except ValueError as e:
      raise ValueError(f'system prompt {system_prompt!r}: {e}') from e
    self.system = self.template.system
    self.tokenizer = text.MemoTokenizer(text.load_tokenizer(
        tokenizer_dir, model_max_length=10 ** 6, force_bos=self.template.force_bos))
    try:
      self.template.check(self.tokenizer)
    except ValueError as e:
      raise ValueError(f'system prompt {system_prompt!r}: the tokenizer {tokenizer_dir} cannot '
                       f'write this conversation template: {e}') from e
    self.teacher_features = teacher_features
    # `VIDEO_CACHE`'s size in MiB (0: every sample decodes its video). A clip's entry takes
    # `frames` x (size^2 + (size / 2)^2) x 3 bytes: 184 KiB at the demo's 4 x 112 px, 5.7 MiB at
    # the paper's 8 x 448 px. Worth it when clips repeat within the cache's reach: several
    # epochs of a small set, or stages of one process over the same videos.
    self.video_cache_mb = float(video_cache_mb)
    self._size_cache()
    self.teacher_shape = None
    if teacher_features:
      self.teacher_shape = features_lib.feature_shape(
          features_lib.read_manifest(teacher_features), frames, stab.target_grid, teacher_features)

  def decode(self, record: Mapping, path: str) -> np.ndarray:
    """uint8 [k, H, W, 3]: the record's sampled frames (k <= frames), decoded from the video.

    The one place a sample's frames come from: `packing.PackedProcessSample` reads them from
    packed shards instead, and everything after it is shared.
    """
    del record
    return decode_frames(path, num=self.frames, timeout_s=self.timeout_s)[0]

  def cache_key(self, record: Mapping, path: str):
    """`VIDEO_CACHE`'s key for the record's clip, or None to decode it every time (a file
    that cannot be read is left to `decode` to report)."""
    del record
    try:
      st = os.stat(path)
    except OSError:
      return None
    s = self.stab
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns, self.frames, s.image_size,
            s.patch_size)

  def _size_cache(self) -> None:
    """Grows `VIDEO_CACHE` to `video_cache_mb` (here, and in a Grain worker, where this object
    arrives unpickled and the worker's own cache starts unsized)."""
    if VIDEO_CACHE.capacity_mb < self.video_cache_mb:
      VIDEO_CACHE.resize(self.video_cache_mb)

  def padded_frames(self, record: Mapping, path: str) -> PaddedFrames:
    """The record's frames decoded and padded: from `VIDEO_CACHE` when it has them."""
    key = self.cache_key(record, path) if self.video_cache_mb else None
    make = lambda: pad_frames(  # noqa: E731
        self.decode(record, path), num=self.frames, size=self.stab.image_size,
        teacher_size=self.stab.image_size // 2, patch=self.stab.patch_size)
    if key is None:
      return make()
    self._size_cache()
    return VIDEO_CACHE.get_or_make(key, make)

  def __call__(self, record: Mapping) -> dict:
    path = os.path.join(self.video_root, record['video'])
    # Only a conversation the template cannot write is a skip (`text.ConversationError`: its
    # shape, its placeholder, a tokenization mismatch); the tokenizer was checked at start, so
    # any other error here is a bug and propagates.
    try:
      turns = text.as_turns(record['conversations'])
      ids, labels = self.template.tokenize(self.tokenizer, turns, num_frames=self.frames)
    except text.ConversationError as e:
      return {'skip': 'bad_conversation', 'path': path, 'detail': str(e)[:200]}
    # Only a file that cannot be decoded is a skip: frames the decoder returned are always
    # usable (at least one, all one size), so an error after decoding is a bug and propagates.
    try:
      v = finish_frames(self.padded_frames(record, path), num=self.frames)
    except VideoDecodeError as e:
      return {'skip': 'bad_video', 'path': path, 'detail': e.reason[:200]}
    hw, _ = frame_grid(v['mask'], self.stab, xp=np)
    lay = frame_layout(hw, self.stab.lsd_grid, xp=np, row_token=self.stab.row_token)
    length = len(ids) - self.frames + int(lay['length'].sum())
    if length > self.max_len:
      return {'skip': 'too_long', 'path': path, 'detail': f'{length} > {self.max_len}'}
    out = {'ids': ids, 'labels': labels, 'pixels': v['pixels'], 'mask': v['mask'],
           'teacher_mask': v['teacher_mask']}
    if self.teacher_features:
      try:
        out['teacher'] = features_lib.load(
            features_lib.feature_path(self.teacher_features, record['video']),
            self.teacher_shape)
      except features_lib.FeatureError as e:
        return {'skip': 'missing_teacher_features', 'path': path, 'detail': str(e)[:200]}
    else:
      out['teacher_pixels'] = v['teacher_pixels']
    return out


def collate(samples: Sequence[Mapping], stab: StabConfig, max_len: int) -> dict:
  """Good samples -> one host batch (layout + stacked frames + teacher frames)."""
  b = len(samples)
  t = max(len(s['ids']) for s in samples)
  ids = np.zeros((b, t), np.int32)
  labels = np.full((b, t), text.IGNORE_INDEX, np.int32)
  am = np.zeros((b, t), np.int32)
  for i, s in enumerate(samples):
    n = len(s['ids'])
    ids[i, :n], labels[i, :n], am[i, :n] = s['ids'], s['labels'], 1
  mask = np.stack([s['mask'] for s in samples])
  lay = layout_batch(ids, labels, am, mask, stab, max_len)
  teacher_mask = np.stack([s['teacher_mask'] for s in samples])
  # Online teacher: its frames; cached: its features.
  key = 'teacher' if 'teacher' in samples[0] else 'teacher_pixels'
  return dict(lay, pixels=np.stack([s['pixels'] for s in samples]), mask=mask,
              teacher_valid=teacher_mask.reshape(b, mask.shape[1], -1).max(-1) > 0,
              **{key: np.stack([s[key] for s in samples])})


class ProcessSlices(grain.MapDataset):
  """Process `process_index`'s slices of the global batches of `parent` (the global stream).

  Element j of this process's sub-stream is stream position
  (j // L) * B + process_index * L + j % L, with B = `global_batch` and L = B / process_count:
  its L consecutive positions of each global batch, batch after batch. With one process it is
  the identity.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int = 0,
               process_count: int = 1):
    super().__init__(parent)
    if global_batch % process_count:
      raise ValueError(f'batch_size={global_batch} is not a multiple of the {process_count} '
                       'processes')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in 0..{process_count - 1}')
    self._batch = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    # Whole global batches of the parent, this process's share of each.
    self._length = len(parent) // global_batch * self._local

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return (f'ProcessSlices(global_batch={self._batch}, local={self._local}, '
            f'offset={self._offset})')

  def position(self, index: int) -> int:
    """The global stream position of this process's element `index`."""
    k, r = divmod(index, self._local)
    return k * self._batch + self._offset + r

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.position(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self.position(i) for i in indices])  # pylint: disable=protected-access


def global_stream(records: Sequence, seed: int) -> grain.MapDataset:
  """The records in training order, the same for every topology: one seeded permutation of
  all of them per epoch (reshuffled each epoch), repeated for ever."""
  return grain.MapDataset.source(list(records)).shuffle(seed=seed).repeat()


GRAIN_READ_THREADS = 16   # Grain's default number of reader threads (grain.ReadOptions)


def read_options(read_threads: int = GRAIN_READ_THREADS) -> grain.ReadOptions:
  """Grain's reader options for `read_threads` threads; -1: one per CPU core of this host, at
  most Grain's default 16; 0 reads in the consuming thread (no read-ahead). On a 2-core host 2
  threads trained the demo as fast as 16 (`benchmarks/cpu_train.py`)."""
  if read_threads == -1:
    read_threads = min(GRAIN_READ_THREADS, os.cpu_count() or 1)
  if read_threads < 0:
    raise ValueError(f'data.read_threads={read_threads}: expected -1 (one per core, at most '
                     f'{GRAIN_READ_THREADS}), 0 (no read-ahead) or a positive count')
  return grain.ReadOptions(num_threads=read_threads)


class TrainIterator:
  """Fixed-shape batches: this process's slices (`ProcessSlices`) of the global batches of the
  shuffled, repeated annotations (see the module docstring). `read_threads`: see
  `read_options` (in each worker process when `num_workers` > 0); the batches are the same
  for any count."""

  def __init__(self, records: Sequence[Mapping], processor: ProcessSample, batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               num_workers: int = 0, max_consecutive_skips: int = 1000,
               read_threads: int = GRAIN_READ_THREADS):
    if batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} is not a multiple of the {process_count} '
                       'processes')
    self.local_batch = batch_size // process_count
    self.batch_size = batch_size
    self.process_index, self.process_count = process_index, process_count
    self.processor = processor
    self.max_skips = max_consecutive_skips
    # One epoch: the whole global batches of the records (the same on every process).
    self.steps_per_epoch = len(records) // batch_size
    ds = ProcessSlices(global_stream(records, seed), batch_size, process_index, process_count)
    ds = ds.map(processor).to_iter_dataset(read_options(read_threads))
    if num_workers > 0:
      from absl import flags
      if not flags.FLAGS.is_parsed():   # Grain's workers read absl flags (pytest, notebooks)
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    self._it = iter(ds)
    self.skipped: collections.Counter = collections.Counter()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    samples, skips = [], 0
    while len(samples) < self.local_batch:
      s = next(self._it)
      if 'skip' in s:
        if s['skip'] not in SKIP_REASONS:
          raise ValueError(f'unknown skip reason {s["skip"]!r} for {s["path"]}; expected one '
                           f'of {SKIP_REASONS}')
        self.skipped[s['skip']] += 1
        skips += 1
        logging.warning('skipped sample (%s): %s: %s', s['skip'], s['path'], s.get('detail'))
        if skips > self.max_skips:
          raise RuntimeError(f'{skips} samples in a row were skipped (last: {s["path"]}: '
                             f'{s["skip"]}); check the data set with panda_jax.data.check')
        continue
      samples.append(s)
    return collate(samples, self.processor.stab, self.processor.max_len)

  def close(self) -> None:
    """Stops Grain's worker processes (if any)."""
    if getattr(self.processor, 'video_cache_mb', 0):
      logging.info('video cache (this process): %s', VIDEO_CACHE.stats())
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()

  def get_state(self) -> dict:
    return {'grain': self._it.get_state(), 'skipped': dict(self.skipped)}

  def set_state(self, state: Mapping) -> None:
    self._it.set_state(state['grain'])
    self.skipped = collections.Counter(state.get('skipped', {}))

  def state_from(self, states: Sequence[Mapping]) -> dict:
    """This process's state from the states every process of a run saved (`states`, in process
    order), whatever process count saved them.

    The same count: its own. Another: every saved process must have stopped at the same whole
    global batch k (the same position k * B / N in its slices: so whenever no sample was
    skipped); this process then continues at global batch k, so the global batches go on as
    they would have on N processes. The skip counters, summed, go to process 0 (the summary
    sums them over the processes). Otherwise a `DataStateError` says why.
    """
    n = len(states)
    if n == self.process_count:
      return dict(states[self.process_index])
    where = (f'the checkpoint\'s data states were saved by {n} processes and this run has '
             f'{self.process_count}')
    if self.batch_size % n:
      raise DataStateError(f'{where}: batch_size={self.batch_size} is not a multiple of {n}')
    saved_local = self.batch_size // n
    grains = [s.get('grain') for s in states]
    if any(not isinstance(g, Mapping) or set(g) != {'next_index'} for g in grains):
      raise DataStateError(f'{where}, and their Grain states ({grains[0]}) hold more than a '
                           f'position (data.num_workers > 0?); resume on {n} processes')
    positions = [int(g['next_index']) for g in grains]
    skipped = [dict(s.get('skipped', {})) for s in states]
    if len(set(positions)) != 1 or positions[0] % saved_local:
      raise DataStateError(
          f'{where}: they stopped at different places in the data (positions {positions} in '
          f'their slices of {saved_local} samples per global batch, after skipping '
          f'{skipped} samples), which {self.process_count} processes cannot continue in the '
          f'same order; resume on {n} processes')
    total = collections.Counter()
    for s in skipped:
      total.update(s)
    k = positions[0] // saved_local
    return {'grain': {'next_index': k * self.local_batch},
            'skipped': dict(total) if self.process_index == 0 else {}}

  def stats(self) -> dict:
    out = {f'skipped_{k}': v for k, v in self.skipped.items()}
    out['skipped_total'] = sum(self.skipped.values())
    return out
