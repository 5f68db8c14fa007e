"""Video decoding and preprocessing (spec section 2): sampling rule, seeking, geometry, errors."""

import time

import av
import numpy as np
import pytest
from PIL import Image

from panda_jax.data import synthetic, video
from panda_jax.data.frames import CLIP_MEAN, CLIP_STD, PAD_RGB, frame_geometry
from panda_jax.data.video import (VideoDecodeError, decode_frames, load_video,
                                  sample_indices)


# ------------------------------------------------------------------------------------------
# Sampling rule: a literal transcription of videopanda/model/dataloader.py lines 9-13, 36-65
# (the reference's `_get_rawvideo_dec`, whole video, video_framerate=1, max_frames=min_frames=8).

def _uniform_sample(lst, n):
  assert n <= len(lst)
  m = len(lst)
  step = m // n
  return [lst[i * step] for i in range(n)]


def _reference_positions(num_video_frames_total, fps, max_frames=8, min_frames=8,
                         num_video_frames=8):
  start_time, end_time = None, None
  f_start = 0 if start_time is None else int(start_time * fps)
  f_end = int(min(1000000000 if end_time is None else end_time * fps,
                  num_video_frames_total - 1))
  num_frames = f_end - f_start + 1
  assert num_frames > 0
  sample_fps = int(1)
  t_stride = int(round(float(fps) / sample_fps))
  all_pos = list(range(f_start, f_end + 1, t_stride))
  if len(all_pos) > max_frames:
    sample_pos = [all_pos[_] for _ in np.linspace(0, len(all_pos) - 1, num=max_frames,
                                                  dtype=int)]
  elif len(all_pos) < min_frames:
    if num_frames < min_frames:
      min_frames = num_frames
    t_stride = max(1, (f_end - f_start) // (min_frames - 1))
    adjusted_f_end = f_start + t_stride * (min_frames - 1)
    sample_pos = list(range(f_start, adjusted_f_end + 1, t_stride))
  else:
    sample_pos = all_pos
  all_images = sample_pos  # get_batch(sample_pos): the frames in this order
  num_video_frames_sampled = min(num_video_frames, len(all_images))
  return _uniform_sample(all_images, num_video_frames_sampled)


FPS = (0.5001, 0.9, 1, 1.5, 2.5, 3.5, 5, 7.9, 12, 15, 23.976, 24, 25, 29.97, 30, 48, 50,
       59.94, 60, 90, 120, 240)


def test_sampling_matches_reference_exhaustively():
  for fps in FPS:
    for n in list(range(2, 1201)) + [1999, 2000, 2001, 7777, 54321, 10 ** 6 + 3]:
      want = _reference_positions(n, fps)
      got = sample_indices(n, fps)
      assert got.tolist() == want, (n, fps)


def test_sampling_where_the_reference_crashes():
  with pytest.raises(ZeroDivisionError):   # n = 1: (n - 1) // (min_frames - 1)
    _reference_positions(1, 30)
  assert sample_indices(1, 30).tolist() == [0]
  with pytest.raises(ValueError):          # fps < 0.5: range() with step 0
    _reference_positions(100, 0.4)
  for n in (2, 7, 8, 9, 100, 5000):
    assert sample_indices(n, 0.4).tolist() == _reference_positions(n, 1)
  with pytest.raises(ValueError):
    sample_indices(0, 30)
  with pytest.raises(ValueError):
    sample_indices(10, float('nan'))
  with pytest.raises(ValueError):
    sample_indices(10, 30, num=6)


@pytest.mark.parametrize('num', [4, 12, 16, 32])
def test_uniform_sampling_for_other_counts(num):
  for n in range(1, 400):
    got = sample_indices(n, 30, num)
    if n <= num:
      assert got.tolist() == list(range(n))
    else:
      assert len(got) == num and got[0] == 0 and got[-1] == n - 1
      assert (np.diff(got) > 0).all()
      np.testing.assert_array_equal(got, np.linspace(0, n - 1, num).astype(int))


# ------------------------------------------------------------------------------------------
# Decoding

def _all_frames(path):
  with av.open(path) as c:
    return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])


def _clip(tmp_path_factory, name, width, height, fps, seconds, gop=12, noise=12, seed=0,
          num_shapes=None):
  path = str(tmp_path_factory.mktemp('v') / f'{name}.mp4')
  scene = synthetic.random_scene(np.random.default_rng(seed), width=width, height=height,
                                 fps=fps, duration_s=seconds, num_shapes=num_shapes,
                                 noise=noise)
  synthetic.write_scene_video(path, scene, gop=gop)
  return path


@pytest.fixture(scope='module')
def gop12(tmp_path_factory):
  # 25 fps, 4 s = 100 frames, keyframe every 12: sampled positions 0, 14, 28, ... are mostly
  # not keyframes, and the noise makes the encoder use B-frames.
  return _clip(tmp_path_factory, 'gop12', 160, 120, 25, 4.0, gop=12)


def test_seek_equals_decode_all(gop12):
  everything = _all_frames(gop12)
  assert len(everything) == 100
  with av.open(gop12) as c:
    types = {str(f.pict_type) for f in c.decode(video=0)}
  assert len(types) == 3  # I, P and B frames
  for num in (8, 16, 32):
    want_idx = sample_indices(100, 25, num)
    for seek in (True, False):
      frames, info = decode_frames(gop12, num=num, seek=seek)
      np.testing.assert_array_equal(info['indices'], want_idx)
      np.testing.assert_array_equal(frames, everything[want_idx])
      assert info['n_frames'] == 100 and info['fps'] == 25 and not info['fell_back']
      assert info['seeked'] == seek
      if not seek:
        assert info['decoded_count'] == 100
  assert sample_indices(100, 25).tolist() == [0, 14, 28, 42, 56, 70, 84, 98]
  frames, info = decode_frames(gop12)
  assert info['decoded_count'] < 50  # 8 wanted frames, each from the keyframe before it
  rng = np.random.default_rng(0)
  for _ in range(10):
    idx = np.sort(rng.choice(100, int(rng.integers(1, 10)), replace=False))
    for skip in (True, False):
      frames, info = decode_frames(gop12, indices=idx, skip_nonref=skip)
      np.testing.assert_array_equal(frames, everything[idx])


def test_kept_rgb_converter_across_sizes_and_threads(gop12, tmp_path_factory):
  # Each reader thread keeps one converter (video._to_rgb); clips of other sizes, decoded in
  # turn and from several threads at once, still come out as a fresh conversion makes them.
  import concurrent.futures
  small = _clip(tmp_path_factory, 'small', 112, 84, 1, 4.0, gop=4, seed=3)
  want = {p: _all_frames(p) for p in (gop12, small)}
  for p in (gop12, small, gop12, small):
    frames, info = decode_frames(p, num=4)
    np.testing.assert_array_equal(frames, want[p][info['indices']])
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    jobs = [(p, pool.submit(decode_frames, p, 4)) for p in (gop12, small) * 6]
    for p, job in jobs:
      frames, info = job.result()
      np.testing.assert_array_equal(frames, want[p][info['indices']])


def test_fallback_counts_by_decoding(gop12, monkeypatch):
  everything = _all_frames(gop12)
  # A container without usable timestamps: the index only gives a packet count.
  monkeypatch.setattr(video, '_packet_index', lambda c, s, d: (None, None, 100))
  frames, info = decode_frames(gop12)
  np.testing.assert_array_equal(frames, everything[sample_indices(100, 25)])
  # A wrong count in the index: a second pass with the decoded count.
  monkeypatch.setattr(video, '_packet_index', lambda c, s, d: (None, None, 150))
  frames, info = decode_frames(gop12)
  np.testing.assert_array_equal(info['indices'], sample_indices(100, 25))
  np.testing.assert_array_equal(frames, everything[info['indices']])
  assert info['decoded_count'] == 200


def test_index_beyond_the_video(gop12):
  with pytest.raises(VideoDecodeError, match='index 100 requested'):
    decode_frames(gop12, indices=[3, 100])
  with pytest.raises(ValueError):
    decode_frames(gop12, indices=[5, 3])


def test_timeout(gop12, monkeypatch):
  with pytest.raises(VideoDecodeError, match='timeout') as e:
    decode_frames(gop12, timeout_s=1e-9)
  assert e.value.path == gop12
  slow = video._decode_packet

  def hanging(packet):
    time.sleep(0.05)
    return slow(packet)

  monkeypatch.setattr(video, '_decode_packet', hanging)
  for seek in (True, False):
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match='timeout') as e:
      decode_frames(gop12, timeout_s=0.3, seek=seek)
    assert time.monotonic() - t0 < 1.0
    assert e.value.path == gop12 and 'timeout' in e.value.reason


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
  return synthetic.write_broken_files(str(tmp_path_factory.mktemp('broken')))


@pytest.mark.parametrize('case', ['truncated', 'truncated_data', 'corrupt', 'empty',
                                  'not_video', 'zero_frames', 'audio_only', 'missing'])
def test_broken_files_raise_video_decode_error(broken, case, tmp_path):
  path = broken.get(case, str(tmp_path / 'does_not_exist.mp4'))
  for seek in (True, False):
    with pytest.raises(VideoDecodeError) as e:
      decode_frames(path, seek=seek)
    assert e.value.path == path and path in str(e.value)
  with pytest.raises(VideoDecodeError):
    load_video(path)


def test_broken_reasons(broken, tmp_path):
  reasons = {}
  for case, path in broken.items():
    with pytest.raises(VideoDecodeError) as e:
      decode_frames(path)
    reasons[case] = e.value.reason
  assert reasons['empty'].startswith('empty file')
  assert reasons['truncated_data'].startswith('truncated')
  assert reasons['zero_frames'].startswith('zero frames')
  assert reasons['audio_only'] == 'no video stream'
  for case in ('truncated', 'corrupt', 'not_video'):
    assert reasons[case].startswith('cannot open'), reasons[case]
  with pytest.raises(VideoDecodeError, match='missing'):
    decode_frames(str(tmp_path / 'nope.mp4'))


def test_a_stream_without_a_decoder_is_an_unsupported_format(broken, monkeypatch):
  """PyAV opens a stream whose codec it cannot decode with `codec_context = None`: a reason,
  not an AttributeError."""
  class Container:
    closed = False

    class streams:  # noqa: N801 - PyAV's attribute
      video = [type('Stream', (), {'codec_context': None})()]

    def close(self):
      Container.closed = True

  monkeypatch.setattr(video.av, 'open', lambda *a, **k: Container())
  with pytest.raises(VideoDecodeError, match='unsupported format: no decoder') as e:
    decode_frames(broken['not_video'])
  assert Container.closed and e.value.path == broken['not_video']


def test_tags_that_are_not_utf8_do_not_stop_decoding(tmp_path):
  """A container or stream title in Latin-1 (not UTF-8) is a good video: PyAV's default
  'strict' metadata decoding would raise UnicodeDecodeError at open."""
  path = str(tmp_path / 'latin1.mkv')
  with av.open(path, 'w', format='matroska') as c:
    c.metadata['title'] = 'TAGé'
    s = c.add_stream('mpeg4', rate=10)
    s.width, s.height, s.pix_fmt = 32, 32, 'yuv420p'
    s.metadata['title'] = 'TAGé'
    for i in range(3):
      frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format='rgb24')
      for packet in s.encode(frame):
        c.mux(packet)
    for packet in s.encode(None):
      c.mux(packet)
  data = open(path, 'rb').read()
  assert data.count('TAGé'.encode()) == 2
  open(path, 'wb').write(data.replace('TAGé'.encode(), 'TAGé'.encode('latin-1') + b' '))
  with pytest.raises(UnicodeDecodeError):
    av.open(path).close()
  for seek in (True, False):
    frames, info = decode_frames(path, seek=seek)
    assert frames.shape == (3, 32, 32, 3) and info['n_frames'] == 3


@pytest.mark.parametrize('name, error', [('_to_rgb', TypeError), ('sample_indices', ValueError),
                                         ('_decode_packet', AssertionError)])
def test_a_bug_in_decoding_propagates(gop12, monkeypatch, name, error):
  """Only the file's own failures become VideoDecodeError: an error of our code (here
  injected) comes out as it is, with its traceback, on both paths."""
  def bug(*args, **kwargs):
    raise error(f'injected bug in {name}')
  monkeypatch.setattr(video, name, bug)
  for seek in (True, False):
    with pytest.raises(error, match='injected bug'):
      decode_frames(gop12, seek=seek)


# ------------------------------------------------------------------------------------------
# Preprocessing

def _pil(frames, h, w):
  return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC))
                   for f in frames])


@pytest.mark.parametrize('h,w', [(72, 128), (128, 72), (64, 64), (10, 16), (96, 34)])
def test_load_video_geometry(tmp_path_factory, h, w):
  path = _clip(tmp_path_factory, f'g{h}x{w}', w, h, 10, 1.2, gop=5, noise=0)
  out = load_video(path)
  frames, _ = decode_frames(path)
  assert len(frames) == 8 and frames.shape[1:3] == (h, w)
  for prefix, size in (('', 448), ('teacher_', 224)):
    px, mask = out[prefix + 'pixels'], out[prefix + 'mask']
    assert px.shape == (8, size, size, 3) and px.dtype == np.float32
    assert mask.shape == (8, size, size) and mask.dtype == np.float32
    g = frame_geometry(h, w, size=size)
    want_mask = np.zeros((size, size), np.float32)
    want_mask[g.top:g.top + g.height, g.left:g.left + g.width] = 1
    assert (mask == want_mask).all()
    content = _pil(frames, g.height, g.width)
    np.testing.assert_allclose(
        px[:, g.top:g.top + g.height, g.left:g.left + g.width],
        (content / 255.0 - CLIP_MEAN) / CLIP_STD, rtol=1e-5, atol=1e-5)
    pad = (PAD_RGB / 255.0 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(px[mask == 0], np.broadcast_to(pad, px[mask == 0].shape),
                               rtol=1e-5, atol=1e-6)
  # The student's geometry is the teacher's, twice as large.
  g, t = frame_geometry(h, w), frame_geometry(h, w, size=224)
  assert (g.height, g.width, g.top, g.left) == (2 * t.height, 2 * t.width, 2 * t.top,
                                                2 * t.left)
  assert out['info']['real_frames'] == 8 and not out['info']['flipped']


def test_short_video_is_padded_with_zero_frames(tmp_path_factory):
  path = _clip(tmp_path_factory, 'short', 64, 48, 10, 0.5, noise=0)  # 5 frames
  out = load_video(path)
  assert out['info']['n_frames'] == 5 and out['info']['indices'].tolist() == [0, 1, 2, 3, 4]
  assert out['info']['real_frames'] == 5
  for prefix in ('', 'teacher_'):
    px, mask = out[prefix + 'pixels'], out[prefix + 'mask']
    assert (px[5:] == 0).all() and (mask[5:] == 0).all()
    assert mask[:5].any(axis=(1, 2)).all() and (px[:5] != 0).any()
  out16 = load_video(path, num=16)
  assert out16['pixels'].shape == (16, 448, 448, 3)
  np.testing.assert_array_equal(out16['pixels'][:8], out['pixels'])


def test_flip_is_an_option(gop12):
  base = load_video(gop12)
  again = load_video(gop12)
  np.testing.assert_array_equal(base['pixels'], again['pixels'])   # deterministic by default
  flipped = load_video(gop12, flip_prob=1.0, rng=np.random.default_rng(0))
  assert flipped['info']['flipped']
  np.testing.assert_array_equal(flipped['pixels'], base['pixels'][:, :, ::-1])
  np.testing.assert_array_equal(flipped['mask'], base['mask'])     # the reference's mask
  np.testing.assert_array_equal(flipped['teacher_pixels'], base['teacher_pixels'])
