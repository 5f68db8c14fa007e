"""The Grain training pipeline on a mixed directory: fixed-shape batches, exact skip counts,
determinism, state restore, and worker processes giving the same batches."""

import collections
import json
import os
import threading
import time

import grain
import numpy as np
import pytest

from panda_jax import config as config_lib
from panda_jax.data import pipeline, synthetic, text, video

FRAMES = 4
MAX_LEN = 400
BATCH = 2
SEED = 5
STAB = config_lib.stab_config(config_lib.model_config('tiny'))
LONG_ANSWER = 'The red square moves to the left and then it stops. ' * 40
# The reason ProcessSample gives each unusable entry of the mixed file: every broken file and
# the missing path fail to decode; a conversation without a placeholder and one with "</s>"
# inside an answer (a tokenization mismatch) fail to tokenize; the long one does not fit.
EXPECTED_SKIPS = {'bad_video': 8, 'bad_conversation': 2, 'too_long': 1}


def _conv(video, answer='A shape moves.', question='<video>\nWhat happens?', id_=None):
  return {'id': id_ or video, 'video': video, 'conversations': [
      {'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]}


def _epoch_order(n, seed):
  """Record indices in the order TrainIterator's first epoch visits them (its shuffle)."""
  ds = grain.MapDataset.source(list(range(n)))[0::1].shuffle(seed=seed)
  return [ds[i] for i in range(n)]


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  """12 good samples (6 clips x caption and instructions) and 11 unusable ones, placed so that
  the first epoch of seed SEED ends on a good sample: its 12 / BATCH batches then consume
  exactly one epoch."""
  root = str(tmp_path_factory.mktemp('mixed'))
  ds = synthetic.make_dataset(root, 6, width=64, height=48, fps=8, duration_s=1.0,
                              eval_fraction=0)
  broken = synthetic.write_broken_files(os.path.join(root, 'videos', 'broken'))
  captions = json.load(open(ds.train_captions))
  instruct = json.load(open(ds.train_instruct))
  good = captions + [dict(e, id=e['id'] + '_qa') for e in instruct]
  vid = captions[0]['video']
  bad = [_conv(os.path.relpath(p, root)) for p in broken.values()]
  bad += [_conv('videos/missing.mp4'),
          _conv(vid, question='What happens?', id_='no_placeholder'),
          _conv(vid, answer='It moves.</s>USER: and then?', id_='eos_in_answer'),
          _conv(vid, answer=LONG_ANSWER, id_='long')]
  assert len(bad) == sum(EXPECTED_SKIPS.values())
  corpus = [m['value'].replace('<video>', '') for e in good for m in e['conversations']]
  tok = text.build_tokenizer(os.path.join(root, 'tokenizer'),
                             (corpus + [text.SYSTEM_PROMPT, 'USER: ASSISTANT:']) * 2)
  n = len(good) + len(bad)
  order = _epoch_order(n, SEED)
  # Good samples at the epoch's last position and wherever else they fall; bad ones between.
  slots = [order[-1]] + [i for i in range(n) if i != order[-1]]
  records = [None] * n
  for slot, entry in zip(slots, good + bad):
    records[slot] = entry
  assert 'id' in records[order[-1]] and records[order[-1]] in good
  path = os.path.join(root, 'mixed.json')
  with open(path, 'w') as f:
    json.dump(records, f)
  records = pipeline.load_annotations(path)   # the loader lets every entry through
  proc = pipeline.ProcessSample(root, tok, STAB, FRAMES, MAX_LEN)
  return dict(root=root, records=records, good=good, proc=proc, tok=proc.tokenizer)


def _iterator(mixed, seed=SEED, workers=0):
  return pipeline.TrainIterator(mixed['records'], mixed['proc'], BATCH, seed=seed,
                                num_workers=workers)


def _close(it):
  it.close()  # ends Grain's worker processes


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _text_tokens(batch, row):
  keep = batch['valid'][row] & (batch['visual_index'][row] < 0)
  return tuple(batch['text_ids'][row][keep].tolist())


def test_one_epoch_full_batches_and_exact_skip_counts(mixed):
  it = _iterator(mixed)
  per_epoch = len(mixed['good']) // BATCH
  batches = [next(it) for _ in range(per_epoch)]
  assert it.get_state()['grain']['next_index'] == len(mixed['records'])   # one epoch exactly
  assert dict(it.skipped) == EXPECTED_SKIPS
  assert it.stats() == {**{f'skipped_{k}': v for k, v in EXPECTED_SKIPS.items()},
                        'skipped_total': 11}
  shapes = {k: v.shape for k, v in batches[0].items()}
  assert shapes['text_ids'] == (BATCH, MAX_LEN)
  assert shapes['pixels'] == (BATCH, FRAMES, STAB.image_size, STAB.image_size, 3)
  assert shapes['teacher_pixels'] == (BATCH, FRAMES, STAB.image_size // 2,
                                      STAB.image_size // 2, 3)
  rows = []
  for b in batches:
    assert {k: v.shape for k, v in b.items()} == shapes
    assert b['valid'].any(-1).all() and b['mask'][:, 0].any(axis=(1, 2)).all()
    assert (b['frame_len'] > 0).all()
    rows += [_text_tokens(b, i) for i in range(BATCH)]
  # Every good sample exactly once, and nothing else.
  want = []
  for e in mixed['good']:
    ids, _ = text.tokenize_conversation(mixed['tok'], e['conversations'], num_frames=FRAMES)
    want.append(tuple(int(i) for i in ids if i != text.IMAGE_TOKEN_INDEX))
  assert collections.Counter(rows) == collections.Counter(want)


def _assert_propagates(mixed, record, error):
  """The injected bug comes out of the sample processor and out of the iterator."""
  with pytest.raises(error, match='injected bug'):
    mixed['proc'](record)
  it = _iterator(mixed)
  try:
    with pytest.raises(error, match='injected bug'):
      next(it)
  finally:
    _close(it)


@pytest.mark.parametrize('module, name, error', [(video, '_to_rgb', TypeError),
                                                 (pipeline, 'finish_frames', ValueError)])
def test_a_bug_in_preprocessing_propagates_instead_of_being_skipped(mixed, monkeypatch, module,
                                                                   name, error):
  """Only an undecodable video is a `bad_video` skip: an error of our code, inside the decoding
  (a TypeError in the colour conversion) or after it (a plain ValueError in the
  normalisation), comes out of the iterator with its traceback instead of being counted."""
  def bug(*args, **kwargs):
    raise error(f'injected bug in {name}')
  monkeypatch.setattr(module, name, bug)
  record = next(r for r in mixed['records'] if r.get('id') == mixed['good'][0]['id'])
  _assert_propagates(mixed, record, error)


@pytest.mark.parametrize('conversations, match', [
    ([{'from': 'human', 'value': '<video>\nQ?'}, {'from': 'human', 'value': 'A.'}], 'alternate'),
    ([{'from': 'human', 'value': '<video>\nQ?'}, {'from': 'gpt', 'value': ''}], 'non-empty'),
    ([{'from': 'human', 'value': '<video>\nQ?'}], 'no answer'),
    ([{'from': 'human', 'value': '<video>\nQ?'}, {'from': 'gpt', 'value': 'A <video>'}],
     'in the answer'),
    ([{'from': 'human', 'value': 'Q?'}, {'from': 'gpt', 'value': 7}], 'must be strings'),
])
def test_a_malformed_conversation_is_a_bad_conversation_skip(mixed, conversations, match):
  record = {'id': 'x', 'video': mixed['good'][0]['video'], 'conversations': conversations}
  out = mixed['proc'](record)
  assert out['skip'] == 'bad_conversation' and match in out['detail'], out


@pytest.mark.parametrize('name, error', [('tokenizer_image_token', ValueError),
                                         ('as_turns', TypeError)])
def test_a_bug_in_tokenising_propagates_instead_of_being_skipped(mixed, monkeypatch, name,
                                                                error):
  """Only a conversation the template cannot write (`text.ConversationError`) is a
  `bad_conversation` skip: a plain ValueError or a TypeError raised while tokenising (our code)
  comes out of the iterator with its traceback instead of being counted."""
  def bug(*args, **kwargs):
    raise error(f'injected bug in {name}')
  monkeypatch.setattr(text, name, bug)
  _assert_propagates(mixed, mixed['good'][0], error)


def test_same_seed_same_batches_other_seed_other_batches(mixed):
  a, b, c = _iterator(mixed), _iterator(mixed), _iterator(mixed, seed=SEED + 1)
  ba = [next(a) for _ in range(4)]
  bb = [next(b) for _ in range(4)]
  bc = [next(c) for _ in range(4)]
  assert all(_equal(x, y) for x, y in zip(ba, bb)) and a.skipped == b.skipped
  assert not all(_equal(x, y) for x, y in zip(ba, bc))


def test_reader_threads_change_no_batch(mixed):
  """`read_threads` only sets how many Grain threads read ahead: none, one or three give the
  default's batches, skips included; -1 means one per core (at most 16), and a bad count is
  refused with its value."""
  ref = _iterator(mixed)
  want = [next(ref) for _ in range(3)]
  for threads in (0, 1, 3):
    it = pipeline.TrainIterator(mixed['records'], mixed['proc'], BATCH, seed=SEED,
                                read_threads=threads)
    assert all(_equal(next(it), w) for w in want), threads
    assert dict(it.skipped) == dict(ref.skipped)
  assert pipeline.read_options(-1).num_threads == min(16, os.cpu_count())
  assert pipeline.read_options(5).num_threads == 5
  with pytest.raises(ValueError, match='read_threads=-2'):
    pipeline.read_options(-2)


def test_restore_replays_the_batches_and_skip_counters(mixed):
  k, m = 3, 5   # the m batches cross into the second epoch
  a = _iterator(mixed)
  for _ in range(k):
    next(a)
  state = json.loads(json.dumps(a.get_state()))   # as a checkpoint stores it
  at_save = dict(a.skipped)
  assert sum(at_save.values()) > 0                 # samples were skipped before the save
  after = [next(a) for _ in range(m)]
  assert sum(a.skipped.values()) > sum(at_save.values())
  b = _iterator(mixed)
  b.set_state(state)
  assert dict(b.skipped) == at_save
  again = [next(b) for _ in range(m)]
  for x, y in zip(after, again):
    assert _equal(x, y)
  assert b.skipped == a.skipped


def test_worker_processes_give_the_same_batches_and_restore(mixed):
  # Outside an absl app (here) the iterator marks absl flags parsed for Grain's workers.
  k, m = 3, 4
  ref = _iterator(mixed)
  want = [next(ref) for _ in range(k)]
  skipped_k = dict(ref.skipped)
  want += [next(ref) for _ in range(m)]
  a = _iterator(mixed, workers=2)
  try:
    for x in want[:k]:
      assert _equal(next(a), x)
    assert dict(a.skipped) == skipped_k
    state = json.loads(json.dumps(a.get_state()))
    for x in want[k:]:
      assert _equal(next(a), x)
    assert a.skipped == ref.skipped
  finally:
    _close(a)
  b = _iterator(mixed, workers=2)
  try:
    b.set_state(state)
    assert dict(b.skipped) == skipped_k
    for x in want[k:]:
      assert _equal(next(b), x)
    assert b.skipped == ref.skipped
  finally:
    _close(b)


def test_system_prompt_is_configurable(mixed):
  """'vicuna_v1' (the released training scripts) says "user" where the spec says "human";
  the learned tokens are the same."""
  good = next(r for r in mixed['records'] if r['id'] == mixed['good'][0]['id'])
  spec = mixed['proc'](good)
  vicuna = pipeline.ProcessSample(mixed['root'], mixed['proc'].tokenizer_dir, STAB, FRAMES,
                                  MAX_LEN, system_prompt='vicuna_v1')(good)
  tok = mixed['tok']
  decode = lambda ids: tok.decode([i for i in ids if i >= 0])
  assert 'curious human' in decode(spec['ids']) and 'curious user' in decode(vicuna['ids'])
  learned = lambda s: [i for i in s['labels'] if i != text.IGNORE_INDEX]
  assert learned(spec) == learned(vicuna) and learned(spec)
  with pytest.raises(ValueError, match="system prompt 'chatml'"):
    pipeline.ProcessSample(mixed['root'], mixed['proc'].tokenizer_dir, STAB, FRAMES, MAX_LEN,
                           system_prompt='chatml')


# The counters of `_Counting` are updated by Grain's reader threads (a module-level lock: the
# processor itself must stay picklable).
_COUNTS = threading.Lock()


class _Counting(pipeline.ProcessSample):
  """Counts decodes per video path (what the cache saves), the frames asked for, and the asks
  still in flight (reader threads read ahead while the test looks)."""

  def __init__(self, *a, **k):
    super().__init__(*a, **k)
    self.decodes, self.asked = collections.Counter(), collections.Counter()
    self.in_flight = 0

  def padded_frames(self, record, path):
    with _COUNTS:
      self.asked[os.path.relpath(path, self.video_root)] += 1
      self.in_flight += 1
    try:
      return super().padded_frames(record, path)
    finally:
      with _COUNTS:
        self.in_flight -= 1

  def decode(self, record, path):
    with _COUNTS:
      self.decodes[os.path.relpath(path, self.video_root)] += 1
    return super().decode(record, path)

  def settled(self, timeout_s: float = 60.0):
    """(cache stats, asks per path, decodes per path) read together once no ask is in flight
    (none can start while the lock is held)."""
    deadline = time.time() + timeout_s
    while True:
      with _COUNTS:
        if not self.in_flight or time.time() > deadline:
          return (pipeline.VIDEO_CACHE.stats(), collections.Counter(self.asked),
                  collections.Counter(self.decodes))
      time.sleep(0.01)


def test_video_cache_gives_the_same_batches_and_decodes_a_good_clip_once(mixed, monkeypatch):
  """`video_cache_mb`: two epochs give bit for bit the batches and skip counts of the uncached
  processor; each good clip is decoded once (a broken file every time it comes: it never
  enters the cache), a rewritten file again; hits are read-only."""
  monkeypatch.setattr(pipeline, 'VIDEO_CACHE', pipeline.VideoCache())
  root, tok = mixed['root'], mixed['proc'].tokenizer_dir
  plain = _Counting(root, tok, STAB, FRAMES, MAX_LEN)
  cached = _Counting(root, tok, STAB, FRAMES, MAX_LEN, video_cache_mb=64)
  assert pipeline.VIDEO_CACHE.capacity_mb == 64
  n = 2 * len(mixed['good']) // BATCH
  a = pipeline.TrainIterator(mixed['records'], plain, BATCH, seed=SEED)
  b = pipeline.TrainIterator(mixed['records'], cached, BATCH, seed=SEED)
  for _ in range(n):
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert a.skipped == b.skipped and sum(b.skipped.values()) == 2 * 11
  good = {e['video'] for e in mixed['good']}
  assert {v: cached.decodes[v] for v in good} == {v: 1 for v in good}
  assert all(plain.decodes[v] > 1 for v in good)       # every clip comes back in this file
  # A file that fails to decode never enters the cache: decoded every time it comes.
  broken = set(plain.decodes) - good - {'videos/missing.mp4'}
  assert broken and all(cached.decodes[v] >= 2 for v in broken)
  stats, asks, decodes = cached.settled()
  assert stats['clips'] == len(good) and stats['evictions'] == 0
  assert stats['misses'] == len(good) + sum(decodes[v] for v in broken)
  asked = sum(n for v, n in asks.items() if v != 'videos/missing.mp4')
  assert stats['hits'] == asked - stats['misses'] > 2 * len(good)
  # The cache is the processor's only memory: another processor of this process shares it.
  record = next(r for r in mixed['records'] if r.get('id') == mixed['good'][0]['id'])
  other = _Counting(root, tok, STAB, FRAMES, MAX_LEN, video_cache_mb=64)
  other(record)
  assert not other.decodes
  hit = pipeline.VIDEO_CACHE.get(other.cache_key(record, os.path.join(root, record['video'])))
  assert not hit.canvas.flags.writeable and not hit.teacher_canvas.flags.writeable
  # A file rewritten in place (another modification time) is decoded again.
  path = os.path.join(root, record['video'])
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
  other(record)
  assert other.decodes[record['video']] == 1
  # Unpickled in a Grain worker, whose module-level cache starts empty and unsized.
  monkeypatch.setattr(pipeline, 'VIDEO_CACHE', pipeline.VideoCache())
  import pickle
  worker = pickle.loads(pickle.dumps(cached))
  worker(record)
  assert pipeline.VIDEO_CACHE.capacity_mb == 64 and len(pipeline.VIDEO_CACHE) == 1


def test_video_cache_keeps_its_size_and_refuses_a_bad_one():
  """Least recently used out past the capacity; an item larger than the whole cache is not
  kept; a negative size is refused naming the field."""
  frames = np.zeros((2, 12, 16, 3), np.uint8)
  item = video.pad_frames(frames, num=2, size=56, teacher_size=28, patch=14)
  cache = pipeline.VideoCache(capacity_mb=2.5 * item.nbytes / 2 ** 20)
  for k in 'abc':
    cache.put(k, video.pad_frames(frames, num=2, size=56, teacher_size=28, patch=14))
  assert cache.get('a') is None and cache.get('b') is not None   # 'b' is now the most recent
  cache.put('d', item)
  assert cache.get('c') is None and cache.get('b') is not None and cache.get('d') is item
  assert len(cache) == 2 and cache.nbytes == 2 * item.nbytes
  assert cache.stats()['evictions'] == 2
  small = pipeline.VideoCache(capacity_mb=0.5 * item.nbytes / 2 ** 20)
  small.put('a', item)
  assert len(small) == 0
  with pytest.raises(ValueError, match='video_cache_mb=-1'):
    pipeline.VideoCache(-1)
