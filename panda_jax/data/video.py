"""Video files -> model inputs: frame sampling, decoding (with seeking), resize, pad, mask.

Spec section 2; the authors' code is `videopanda/model/dataloader.py::_get_rawvideo_dec`
(sampling, lines 9-65) and `videopanda/train/train.py` lines 856-974 /
`videopanda/mm_utils.py::process_video_images` lines 105-209 (resize, pad, mask, zero-frame
padding).

Frame sampling (`sample_indices`)
  Frame indices are positions in the decoded stream (0 = first decoded frame). For 8 frames
  (the released model) the authors' rule: stride `round(fps)` (one frame per second, `fps` the
  container's average rate), candidates `range(0, n, stride)`; more than 8 candidates -> the
  candidates at `np.linspace(0, count - 1, 8, dtype=int)`; fewer than 8 -> `m = min(8, n)`
  frames with stride `max(1, (n - 1) // (m - 1))` from frame 0; exactly 8 -> all candidates.
  The reference's final `uniform_sample(frames, min(8, len))` is the identity here (it never
  gets more than 8 frames). Two inputs crash the reference and are defined here instead:
  n = 1 (`(n - 1) // 0`) gives [0], and fps < 0.5 (`range` with step 0) uses stride 1.
  Other frame counts (multiples of 4: 16, 32, ...) use uniform sampling over the whole video,
  `np.linspace(0, n - 1, num, dtype=int)` (all frames when n <= num). This is our choice: the
  reference run with NUM_FRAMES = 16 keeps `min_frames = 8`, so a 10-second clip would give
  10 real frames and 6 zero frames; the released model was only trained with 8.

Decoding (`decode_frames`)
  One pass over the packets (demuxing only, no decoding) indexes the stream: the presentation
  timestamps of all frames, sorted, give each frame's position, and the keyframe flags give
  the places a decoder can start. For each wanted frame, in order: if a keyframe lies after
  the last decoded frame and at or before the target, seek to that keyframe and decode
  forward; otherwise keep decoding. Frames are identified by their timestamp, so the result
  is the same as decoding everything and counting (tested). Where timestamps are missing or
  repeated, or a decoded frame is not where the index says, it falls back to sequential
  decoding that counts frames (a second pass picks the frames if the count differs from the
  index). `seek=False` always decodes sequentially (the baseline). While decoding towards a
  target, packets that are not wanted are decoded with `skip_frame = NONREF`, so frames that
  nothing references (most B-frames) are dropped inside the decoder (`skip_nonref`).
  Colour conversion to RGB is FFmpeg's (swscale via PyAV); the reference's decord converts
  with its own settings, so pixel values may differ from it by a few levels.

  Failures of the file raise `VideoDecodeError(path, reason)`: missing file, unreadable /
  corrupt / truncated container, no video stream, a codec without a decoder, zero frames,
  FFmpeg's own errors (`av.error.FFmpegError`: demuxer, decoder, colour conversion), and a
  per-video time budget (`timeout_s`). Anything else (a TypeError, a ValueError of ours) is a
  bug and propagates as it is. The budget is checked between packets and frames and handed to
  FFmpeg as its I/O timeout; one C call that never returns (a decoder stuck inside a single
  packet) can only be stopped by running the loader in a separate process.

Preprocessing (`load_video`)
  Each decoded frame is resized with PIL's bicubic filter (the reference's `Image.resize`
  default) straight from the decoded frame to the student size and, separately, to the teacher
  size, from `frames.frame_geometry`, and padded with the mean colour in 8 bits (`pad_frames`,
  what `pipeline.VideoCache` keeps); then `finish_frames` normalises and builds the mask.
  Videos with fewer than `num` frames get all-zero frames (pixels 0 after normalisation, mask
  0), as the reference.

  Random flip: the reference's LanguageBind video processors end with
  `RandomHorizontalFlipVideo(p=0.5)`, so the student clip (and, independently, the teacher
  clip) is flipped with probability 0.5 on every call, at inference too, after padding and
  without flipping the mask. Flipping is off here by default (`flip_prob=0.0`): it makes
  evaluation non-deterministic, flips left/right questions' answers, and on frames with
  unequal left/right padding (portrait videos whose padding is an odd number of patches)
  it moves the content one patch away from its mask. `flip_prob=0.5` with an `rng`
  reproduces the reference (student pixels only; the mask stays as it is).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import threading
import time

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from panda_jax.data.frames import (FrameGeometry, content_mask, frame_geometry, normalise,
                                   pad)

REFERENCE_NUM_FRAMES = 8


class VideoDecodeError(RuntimeError):
  """A video could not be decoded; `path` and `reason` say which and why."""

  def __init__(self, path, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = str(path)
    self.reason = reason


def sample_indices(n_frames: int, fps: float, num: int = 8) -> np.ndarray:
  """Positions (in the decoded stream) of the frames to use; see the module docstring.

  Returns int64 [k], increasing, k = num when n_frames >= num, else k = n_frames.
  """
  n = int(n_frames)
  if n < 1:
    raise ValueError(f'n_frames={n_frames}: a video needs at least one frame')
  if num < 4 or num % 4:
    raise ValueError(f'num={num} must be a positive multiple of 4 (chunks of 4 frames)')
  if num != REFERENCE_NUM_FRAMES:
    if n <= num:
      return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, num, dtype=np.int64)
  fps = float(fps)
  if not math.isfinite(fps) or fps <= 0:
    raise ValueError(f'fps={fps} must be positive and finite')
  stride = max(1, int(round(fps)))
  cands = np.arange(0, n, stride, dtype=np.int64)
  if len(cands) > num:
    return cands[np.linspace(0, len(cands) - 1, num, dtype=int)]
  if len(cands) < num:
    m = min(num, n)
    if m == 1:
      return np.zeros(1, np.int64)
    step = max(1, (n - 1) // (m - 1))
    return np.arange(m, dtype=np.int64) * step
  return cands


# ------------------------------------------------------------------------------------------
# Decoding


class _Deadline:

  def __init__(self, path, timeout_s):
    self.path, self.timeout_s = path, timeout_s
    self.end = time.monotonic() + timeout_s if timeout_s else math.inf

  def check(self, doing: str):
    if time.monotonic() > self.end:
      raise VideoDecodeError(self.path, f'timeout: over {self.timeout_s:g} s while {doing}')


# PyAV errors that are not about the file: a timeout (ExitError from the interrupt callback,
# TimeoutError from FFmpeg's I/O; `decode_frames` reports both as a 'timeout' reason) and an
# exception raised by Python code that FFmpeg called back (ours, so a bug: it propagates).
_NOT_DECODE_ERRORS = (av.error.ExitError, av.error.TimeoutError, av.error.PyAVCallbackError)


class _Fallback(Exception):
  """The seeking path met something it cannot handle; decode sequentially instead."""


def _decode_packet(packet):
  """Decodes one packet (a function so that tests can slow it down)."""
  return packet.decode()


def _frames(container, stream, deadline, keep=None):
  """Decoded frames in output (presentation) order from the current position.

  With `keep` (a set of pts), packets whose pts is not in it are decoded with
  `skip_frame = NONREF`: a frame no other frame refers to (most B-frames) and that is not
  wanted is dropped inside the decoder. By definition no other frame depends on it, so the
  wanted frames come out bit-identical, at a fraction of the cost.
  """
  cc = stream.codec_context
  mode = None
  for packet in container.demux(stream):
    deadline.check('demuxing')
    if keep is not None:
      want = 'DEFAULT' if packet.pts is None or packet.pts in keep else 'NONREF'
      if want != mode:
        cc.skip_frame = mode = want
    for frame in _decode_packet(packet):
      deadline.check('decoding')
      yield frame


# One swscale converter per thread: `frame.to_ndarray(format='rgb24')` builds a converter for
# every frame (0.8 ms for a 112 x 84 frame on the demo's host, six times the conversion itself);
# a kept one rebuilds only when the frame's size or format changes. Threads (Grain's readers)
# cannot share one.
_RGB = threading.local()


def _to_rgb(frame) -> np.ndarray:
  reformatter = getattr(_RGB, 'reformatter', None)
  if reformatter is None:
    reformatter = _RGB.reformatter = VideoReformatter()
  return reformatter.reformat(frame, format='rgb24').to_ndarray()


def _open(path, deadline, threads):
  try:
    # Tags that are not UTF-8 (older muxers write Latin-1) would raise UnicodeDecodeError at
    # open with PyAV's default 'strict'; nothing here reads them.
    container = av.open(path, timeout=(deadline.timeout_s, deadline.timeout_s)
                        if deadline.timeout_s else None, metadata_errors='replace')
  except _NOT_DECODE_ERRORS:
    raise
  except av.error.FFmpegError as e:
    raise VideoDecodeError(path, f'cannot open (corrupt, truncated or not a video): '
                                 f'{type(e).__name__}: {e}') from e
  if not container.streams.video:
    container.close()
    raise VideoDecodeError(path, 'no video stream')
  stream = container.streams.video[0]
  if stream.codec_context is None:  # PyAV opens a stream it has no decoder for
    container.close()
    raise VideoDecodeError(path, 'unsupported format: no decoder for its video stream\'s codec')
  stream.codec_context.thread_count = int(threads)
  if threads != 1:
    stream.codec_context.thread_type = 'AUTO'
  return container, stream


def _stream_fps(stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate is not None and rate > 0:
      return float(rate)
  return math.nan


def _packet_index(container, stream, deadline):
  """(sorted presentation timestamps, sorted keyframe timestamps, packet count).

  Timestamps are None when some packet has none or two frames share one (then positions
  must be counted by decoding).
  """
  pts, keys, count = [], [], 0
  usable = True
  for packet in container.demux(stream):
    deadline.check('indexing packets')
    if packet.size == 0:          # the flush packet at the end
      continue
    count += 1
    if packet.is_discard:         # dropped by the decoder (e.g. before an edit list start)
      continue
    if packet.pts is None:
      usable = False
      continue
    pts.append(packet.pts)
    if packet.is_keyframe:
      keys.append(packet.pts)
  pts.sort()
  keys.sort()
  if not usable or len(set(pts)) != len(pts):
    return None, None, count
  return pts, keys, count


def _sequential(path, pick, threads, deadline, n_hint):
  """Decodes from the start, counting frames; picks the sampled positions.

  With `n_hint` (the index's frame count) one pass suffices when the count agrees; otherwise
  the first pass counts and a second one picks. Returns (frames, indices, n, decoded).
  """
  decoded = 0
  n = n_hint
  for _ in range(2):
    indices = pick(n) if n else np.zeros(0, np.int64)
    wanted = {int(i): None for i in indices}
    container, stream = _open(path, deadline, threads)
    try:
      pos = 0
      for frame in _frames(container, stream, deadline):
        if pos in wanted:
          wanted[pos] = _to_rgb(frame)
        pos += 1
      decoded += pos
    finally:
      container.close()
    if pos == 0:
      raise VideoDecodeError(path, 'zero frames decoded')
    if pos == n:
      return [wanted[int(i)] for i in indices], indices, n, decoded
    n = pos  # the index was wrong (or absent): decode again knowing the true count
  raise VideoDecodeError(path, f'frame count changed between passes ({n_hint} -> {n})')


def _seeking(container, stream, pts, keys, indices, deadline, skip_nonref):
  """Frames at `indices` using seeks; raises _Fallback where the index is not trusted."""
  position = {p: i for i, p in enumerate(pts)}
  keep = {pts[int(i)] for i in indices} if skip_nonref else None
  out = []
  gen = None
  last = None        # pts of the last decoded frame
  seeks = decoded = 0
  for idx in indices:
    target = pts[int(idx)]
    k = bisect.bisect_right(keys, target) - 1
    if k < 0:
      raise _Fallback('no keyframe at or before a target')
    key = keys[k]
    if gen is None or key > last:
      # The first seek only positions the decoder (the index pass left it at the end); it
      # skips frames when the first target's keyframe is not the first frame.
      seeks += int(gen is not None or key > pts[0])
      if gen is not None:
        gen.close()  # finish the old demuxer before the new one starts
      container.seek(key, stream=stream, backward=True, any_frame=False)
      gen = _frames(container, stream, deadline, keep)
      last = None
    got = None
    for frame in gen:
      decoded += 1
      p = frame.pts
      if p is None or p not in position:
        raise _Fallback(f'decoded frame with unknown pts {p}')
      last = p
      if p == target:
        got = _to_rgb(frame)
        break
      if p > target:
        raise _Fallback(f'target pts {target} skipped (got {p})')
    if got is None:
      raise _Fallback(f'stream ended before pts {target}')
    out.append(got)
  return out, seeks, decoded


def decode_frames(path, num: int = 8, timeout_s: float | None = 30.0, seek: bool = True,
                  threads: int = 1, skip_nonref: bool = True, indices=None):
  """Decodes the sampled frames of a video.

  Returns (frames uint8 [k, H, W, 3], info) with k = min(num, n_frames) and info:
  n_frames, fps, indices (positions returned), decoded_count (frames decoded, all passes),
  seeked (a seek skipped frames), seeks, fell_back (the seeking path gave up), frames_declared
  (the container's count, 0 if unknown), codec, width, height, elapsed_s.
  `threads`: decoder threads (1 = like the reference's decord `num_threads=1`; 0 = FFmpeg's
  choice). `skip_nonref` (seeking path only): let the decoder drop unwanted frames that no
  other frame references (see `_frames`). `indices`: explicit increasing positions instead
  of `sample_indices` (tests, tools). Raises VideoDecodeError when the file cannot be
  decoded (module docstring); other errors are bugs and propagate.
  """
  path = os.fspath(path)
  start = time.monotonic()
  if indices is not None:
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or not len(indices) or (np.diff(indices) <= 0).any() or indices[0] < 0:
      raise ValueError(f'indices must be increasing and non-negative, got {indices}')
  deadline = _Deadline(path, timeout_s)
  if not os.path.exists(path):
    raise VideoDecodeError(path, 'missing: no such file')
  if os.path.isdir(path):
    raise VideoDecodeError(path, 'is a directory')
  if os.path.getsize(path) == 0:
    raise VideoDecodeError(path, 'empty file (0 bytes)')
  try:
    return _decode(path, num, threads, deadline, seek, skip_nonref, start, indices)
  except (av.error.ExitError, av.error.TimeoutError) as e:
    raise VideoDecodeError(path, f'timeout: {e}') from e
  except _NOT_DECODE_ERRORS:
    raise
  except av.error.FFmpegError as e:  # the file's bytes, as FFmpeg (demuxer, decoder) saw them
    raise VideoDecodeError(path, f'{type(e).__name__}: {e}') from e


def _decode(path, num, threads, deadline, seek, skip_nonref, start, explicit):
  container, stream = _open(path, deadline, threads)
  info = {'codec': stream.codec_context.name, 'width': stream.codec_context.width,
          'height': stream.codec_context.height, 'frames_declared': int(stream.frames or 0),
          'seeked': False, 'seeks': 0, 'fell_back': False}

  def pick(n):
    if explicit is None:
      return sample_indices(n, fps, num)
    if explicit[-1] >= n:
      raise VideoDecodeError(path, f'index {explicit[-1]} requested, the video has {n} frames')
    return explicit

  try:
    fps = _stream_fps(stream)
    if not math.isfinite(fps):
      raise VideoDecodeError(path, 'no frame rate in the container')
    info['fps'] = fps
    pts, keys, count = _packet_index(container, stream, deadline)
    if count == 0:
      raise VideoDecodeError(path, 'zero frames (no video packets)')
    if info['frames_declared'] > count:
      raise VideoDecodeError(path, f'truncated: the container declares '
                                   f'{info["frames_declared"]} frames, only {count} packets '
                                   f'can be read')
    frames = None
    if seek and pts:
      indices = pick(len(pts))
      try:
        frames, seeks, decoded = _seeking(container, stream, pts, keys, indices, deadline,
                                          skip_nonref)
        info.update(n_frames=len(pts), indices=indices, decoded_count=decoded,
                    seeks=seeks, seeked=seeks > 0)
      except _Fallback as e:
        info['fell_back'] = str(e)
        frames = None
  finally:
    container.close()
  if frames is None:
    n_hint = len(pts) if pts else count
    frames, indices, n, decoded = _sequential(path, pick, threads, deadline, n_hint)
    info.update(n_frames=n, indices=indices, decoded_count=decoded)
  shapes = {f.shape for f in frames}
  if len(shapes) != 1:
    raise VideoDecodeError(path, f'frame size changes inside the video: {sorted(shapes)}')
  info['elapsed_s'] = time.monotonic() - start
  return np.stack(frames), info


# ------------------------------------------------------------------------------------------
# Preprocessing


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL bicubic resize of uint8 [k, h, w, 3] to [k, height, width, 3] (the reference's
  `Image.resize((w, h))`, whose default filter for RGB images is bicubic)."""
  return np.stack([np.asarray(Image.fromarray(f, 'RGB').resize((width, height),
                                                                Image.Resampling.BICUBIC))
                   for f in frames])


@dataclasses.dataclass(frozen=True)
class PaddedFrames:
  """A clip's frames resized and padded in 8-bit colour, before normalisation: what
  `preprocess_frames` makes of decoded frames up to its last, cheap step (`finish_frames`).
  About a sixth of the finished arrays' bytes (`pipeline.VideoCache` keeps these)."""
  canvas: np.ndarray            # uint8 [k, size, size, 3] (the student's)
  geometry: FrameGeometry
  teacher_canvas: np.ndarray    # uint8 [k, teacher_size, teacher_size, 3]
  teacher_geometry: FrameGeometry

  @property
  def nbytes(self) -> int:
    return self.canvas.nbytes + self.teacher_canvas.nbytes


def pad_frames(frames: np.ndarray, num: int = 8, size: int = 448, teacher_size: int = 224,
               patch: int = 14) -> PaddedFrames:
  """uint8 [k, H, W, 3] decoded frames (k <= num) -> `PaddedFrames` for the student (`size`)
  and the teacher (`teacher_size`)."""
  k, h, w, _ = frames.shape
  if not 1 <= k <= num:
    raise ValueError(f'{k} frames for num={num}')
  out = []
  for s in (size, teacher_size):
    g = frame_geometry(h, w, size=s, teacher_size=teacher_size, patch=patch)
    out += [pad(_resize(frames, g.height, g.width), g), g]
  return PaddedFrames(*out)


def finish_frames(padded: PaddedFrames, num: int = 8, flip_prob: float = 0.0,
                  rng: np.random.Generator | None = None) -> dict:
  """`PaddedFrames` -> `preprocess_frames`' arrays (normalised, masked, `num` frames)."""
  k = len(padded.canvas)
  if not 1 <= k <= num:
    raise ValueError(f'{k} frames for num={num}')
  out = {}
  for key, canvas, g in (('', padded.canvas, padded.geometry),
                         ('teacher_', padded.teacher_canvas, padded.teacher_geometry)):
    pixels = np.zeros((num, g.size, g.size, 3), np.float32)
    mask = np.zeros((num, g.size, g.size), np.float32)
    pixels[:k], mask[:k] = normalise(canvas), content_mask(g, k)
    out[key + 'pixels'], out[key + 'mask'] = pixels, mask
  out['flipped'] = False
  if flip_prob > 0:
    rng = rng if rng is not None else np.random.default_rng()
    if rng.random() < flip_prob:  # whole student clip, pixels only (as the reference)
      out['pixels'][:k] = out['pixels'][:k, :, ::-1]
      out['flipped'] = True
  return out


def preprocess_frames(frames: np.ndarray, num: int = 8, size: int = 448,
                      teacher_size: int = 224, patch: int = 14, flip_prob: float = 0.0,
                      rng: np.random.Generator | None = None) -> dict:
  """uint8 [k, H, W, 3] decoded frames (k <= num) -> padded, masked, normalised arrays."""
  return finish_frames(pad_frames(frames, num, size, teacher_size, patch), num, flip_prob, rng)


def load_video(path, num: int = 8, size: int = 448, teacher_size: int = 224, patch: int = 14,
               flip_prob: float = 0.0, rng: np.random.Generator | None = None,
               timeout_s: float | None = 30.0, seek: bool = True, threads: int = 1,
               skip_nonref: bool = True) -> dict:
  """Decodes and preprocesses one video for the student (`size`) and the teacher.

  Returns pixels float32 [num, size, size, 3], mask float32 [num, size, size],
  teacher_pixels [num, teacher_size, teacher_size, 3], teacher_mask [num, teacher_size,
  teacher_size], info (decode_frames' info plus `flipped`, `real_frames`). Raises
  VideoDecodeError when the video cannot be decoded.
  """
  frames, info = decode_frames(path, num=num, timeout_s=timeout_s, seek=seek,
                               threads=threads, skip_nonref=skip_nonref)
  out = preprocess_frames(frames, num=num, size=size, teacher_size=teacher_size, patch=patch,
                          flip_prob=flip_prob, rng=rng)
  info['flipped'] = out.pop('flipped')
  info['real_frames'] = len(frames)
  out['info'] = info
  return out
