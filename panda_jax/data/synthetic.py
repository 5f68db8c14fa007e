"""Deterministic synthetic video data: real encoded clips of moving coloured shapes.

Each clip shows one to `max_shapes` coloured shapes (square, circle, triangle) on a plain
background. Every shape moves in a straight line in one direction (left, right, up or down)
from the frame it appears on to the end of the clip. Each fact a question asks about is drawn
on its own for every shape (`random_scene`): its direction, the frame it appears on (frame 0
included, so "visible at the start" and "which appears first" are separate facts) and the half
of the frame it ends in. Everything is drawn from `seed`: the same seed gives the same scenes,
the same annotation files and, with the same PyAV/FFmpeg build, the same bytes.

The clips are encoded by PyAV into MP4: H.264 (`libx264`) where PyAV's FFmpeg has it,
otherwise MPEG-4 part 2 (`mpeg4`). `gop` sets the keyframe interval (scene-cut keyframes are
disabled for libx264, so keyframes are exactly every `gop` frames).

Annotation files written by `make_dataset` (paths relative to `root`):

* `train_captions.json` - stages 1-2: one caption conversation per training clip.
* `train_instruct.json` - stage 3: multi-turn question/answer conversations per training
  clip. Both in the LLaVA/Video-ChatGPT training format
  `[{"id", "video": relpath, "conversations": [{"from": "human", "value": "<video>\\n..."},
  {"from": "gpt", "value": ...}, ...]}]`.
* `eval_qa.json` - VideoQA on the test clips, which are in no training file, in the
  Video-ChatGPT question style `[{"video_name", "question", "question_id", "answer", "type"}]`
  (`video_name` is the file stem; the file is `videos/<video_name>.mp4`). Every question
  needs temporal information: direction of motion, order of appearance, what is visible at the
  start, where a shape ends. `val_qa.json` - the same on the validation clips; `novel_qa.json`
  - on clips showing a condition (`HeldOut`) no other clip shows, with its `condition`.
* `scenes.json` - the ground truth of every clip (shapes, colours, directions, appearance
  frames, start/end centres, its split) for tests and analysis.

`write_broken_files` writes the failure cases a loader must survive: truncated files (index
at the end, and index at the front with the data cut), corrupt headers, a zero-length file, a
non-video file, a container with a video stream and no frames, and an audio-only file.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import json
import os
from typing import Sequence

import av
import numpy as np

DIRECTIONS = ('left', 'right', 'up', 'down')
KINDS = ('square', 'circle', 'triangle')
# Saturated colours far from each other and from the dark background.
COLOURS = {
    'red': (230, 40, 40),
    'green': (40, 200, 60),
    'blue': (50, 80, 240),
    'yellow': (240, 230, 50),
    'magenta': (230, 50, 220),
    'cyan': (50, 220, 230),
    'white': (245, 245, 245),
    'orange': (250, 140, 20),
}
_DIRECTION_PHRASE = {'left': 'moves to the left', 'right': 'moves to the right',
                     'up': 'moves upward', 'down': 'moves downward'}
_NUMBER_WORD = {1: 'one', 2: 'two', 3: 'three', 4: 'four', 5: 'five', 6: 'six'}


def default_codec() -> str:
  """'libx264' if PyAV's FFmpeg can encode H.264 with it, else 'mpeg4'."""
  try:
    av.codec.Codec('libx264', 'w')
    return 'libx264'
  except Exception:  # noqa: BLE001 - any failure means "not available"
    return 'mpeg4'


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str                      # 'square' | 'circle' | 'triangle'
  colour: str                    # key of COLOURS
  radius: int                    # half-size in pixels
  direction: str                 # 'left' | 'right' | 'up' | 'down'
  appear: int                    # first frame on which the shape is drawn
  start: tuple[float, float]     # centre (x, y) on frame `appear`
  end: tuple[float, float]       # centre (x, y) on the last frame

  def centre(self, t: int, num_frames: int) -> tuple[float, float] | None:
    """Centre (x, y) on frame t, or None if not yet visible."""
    if t < self.appear:
      return None
    span = max(num_frames - 1 - self.appear, 1)
    a = (t - self.appear) / span
    return (self.start[0] + a * (self.end[0] - self.start[0]),
            self.start[1] + a * (self.end[1] - self.start[1]))

  @property
  def name(self) -> str:
    return f'{self.colour} {self.kind}'


@dataclasses.dataclass(frozen=True)
class Scene:
  width: int
  height: int
  fps: fractions.Fraction
  num_frames: int
  background: tuple[int, int, int]
  shapes: tuple[Shape, ...]      # in order of appearance
  noise: int = 0                 # amplitude of per-frame sensor-like noise (0: clean frames)
  noise_seed: int = 0

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d['fps'] = str(self.fps)
    return d


def _as_fraction(fps) -> fractions.Fraction:
  f = fractions.Fraction(fps).limit_denominator(1001)
  if f <= 0:
    raise ValueError(f'fps={fps} must be positive')
  return f


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Conditions the training clips never show, for a generalisation test: colour-kind pairs
  (a "red triangle") and kind-direction pairs (a square moving up). Clips drawn with `exclude`
  set to one avoid them all; a clip drawn with `novel` shows one of them on one shape."""
  pairs: tuple[tuple[str, str], ...] = ()        # (colour, kind)
  motions: tuple[tuple[str, str], ...] = ()      # (kind, direction)

  def __post_init__(self):
    for colour, kind in self.pairs:
      if colour not in COLOURS or kind not in KINDS:
        raise ValueError(f'held-out pair ({colour!r}, {kind!r}): expected a colour of '
                         f'{tuple(COLOURS)} and a kind of {KINDS}')
    for kind, direction in self.motions:
      if kind not in KINDS or direction not in DIRECTIONS:
        raise ValueError(f'held-out motion ({kind!r}, {direction!r}): expected a kind of '
                         f'{KINDS} and a direction of {DIRECTIONS}')

  def condition(self, colour: str, kind: str, direction: str) -> str:
    """'colour-kind' or 'kind-direction' when the shape shows a held-out condition, else ''."""
    if (colour, kind) in self.pairs:
      return 'colour-kind'
    if (kind, direction) in self.motions:
      return 'kind-direction'
    return ''


# The demo's held-out conditions: three of the 24 colour-kind pairs and three of the 12
# kind-direction pairs, each kind and each direction held out at most once.
DEMO_HELD_OUT = HeldOut(pairs=(('red', 'triangle'), ('blue', 'circle'), ('yellow', 'square')),
                        motions=(('square', 'up'), ('circle', 'left'), ('triangle', 'down')))


def last_appearance(num_frames: int) -> int:
  """The latest frame a shape may appear on: inside the first 70 % of the clip, so it moves
  on at least one more frame (0 for a clip of one frame)."""
  return (7 * (num_frames - 1)) // 10


def path_reach(width: int, height: int, radius: int) -> float:
  """The longest straight path (pixels) a shape of `radius` can take inside the frame in any
  direction and still end in either half, 4 % of the width clear of the middle."""
  lo_x, hi_x = radius + 1, width - radius - 2
  lo_y, hi_y = radius + 1, height - radius - 2
  mid, gap = width / 2, max(1.0, 0.04 * width)
  return float(min(mid - gap - lo_x, hi_x - mid - gap, hi_y - lo_y))


def random_scene(rng: np.random.Generator, width: int = 160, height: int = 120, fps=10,
                 duration_s: float = 3.0, max_shapes: int = 3, num_shapes: int | None = None,
                 directions: Sequence[str] | None = None, noise: int = 0,
                 travel: float = 1.0, size: float = 0.1, exclude: HeldOut | None = None,
                 novel: HeldOut | None = None) -> Scene:
  """A random scene; `num_shapes` / `directions` pin those choices (for tests).

  Every fact a question asks about is drawn on its own, for each shape: its colour (distinct in
  a clip), kind, direction, the frame it appears on (uniform over 0 .. `last_appearance`, so
  "visible at the start" and "which appears first" are separate facts, and two shapes may
  appear together) and the half of the frame (left or right) it ends in, whatever its direction.
  Every shape moves along a straight path inside the frame from its appearance to the last
  frame, the same distance whenever it appears: `travel` of the longest path that can end in
  either half whatever the direction (`path_reach`); its end is at least 4 % of the width from
  the middle, so the half is never a matter of a pixel. `size`: a shape's half-size as a
  fraction of the frame's shorter side. The number of shapes is uniform in [1, max_shapes] unless `num_shapes` pins it.
  `noise` > 0 adds deterministic per-frame noise of that amplitude (in 8-bit levels), which
  makes the clips cost about as much to decode as camera footage instead of almost nothing.
  `exclude`: no shape shows one of its held-out conditions. `novel`: the clip's first drawn
  shape shows one of its conditions (drawn uniformly among them), the others none.
  Shapes are listed in order of appearance.
  """
  if not 0.0 < travel <= 1.0:
    raise ValueError(f'travel={travel} must be in (0, 1]')
  if not 0.0 < size <= 0.25:
    raise ValueError(f'size={size} must be in (0, 0.25]')
  fps = _as_fraction(fps)
  num_frames = max(1, int(round(float(fps) * duration_s)))
  if max_shapes < 1:
    raise ValueError(f'max_shapes={max_shapes} must be at least 1')
  k = int(num_shapes) if num_shapes is not None else int(rng.integers(1, max_shapes + 1))
  if not 1 <= k <= len(COLOURS):
    raise ValueError(f'num_shapes={k} must be in [1, {len(COLOURS)}]')
  avoid = HeldOut(pairs=tuple((exclude.pairs if exclude else ()) +
                              (novel.pairs if novel else ())),
                  motions=tuple((exclude.motions if exclude else ()) +
                                (novel.motions if novel else ())))
  colours = [str(c) for c in rng.choice(list(COLOURS), size=k, replace=False)]
  bg = tuple(int(v) for v in rng.integers(10, 50, 3))
  radius = max(2, int(min(width, height) * size))
  lo_x, hi_x = radius + 1, width - radius - 2
  lo_y, hi_y = radius + 1, height - radius - 2
  mid, gap = width / 2, max(1.0, 0.04 * width)
  reach = path_reach(width, height, radius)
  if reach <= 0:
    raise ValueError(f'a {width}x{height} frame has no room for a shape of radius {radius} px '
                     f'to move and end in either half (size={size})')
  length = travel * reach
  last = last_appearance(num_frames)
  drawn = []
  for i in range(k):
    d = directions[i] if directions is not None else DIRECTIONS[int(rng.integers(4))]
    if d not in DIRECTIONS:
      raise ValueError(f'direction {d!r} not in {DIRECTIONS}')
    if novel is not None and i == 0:
      colour, kind, d = _novel_identity(rng, novel, avoid, colours)
    else:
      colour = colours[i]
      kinds = [x for x in KINDS if not avoid.condition(colour, x, d)]
      if not kinds:
        raise ValueError(f'no kind of {KINDS} is allowed for a {colour} shape moving {d}')
      kind = kinds[int(rng.integers(len(kinds)))]
    appear = int(rng.integers(last + 1))
    half = ('left', 'right')[int(rng.integers(2))]
    start, end = _path(rng, d, half, length, (lo_x, hi_x, lo_y, hi_y), mid, gap)
    drawn.append(Shape(kind=kind, colour=colour, radius=radius, direction=d, appear=appear,
                       start=start, end=end))
  shapes = tuple(sorted(drawn, key=lambda sh: sh.appear))     # stable: ties keep their draw
  return Scene(width=width, height=height, fps=fps, num_frames=num_frames, background=bg,
               shapes=shapes, noise=int(noise), noise_seed=int(rng.integers(2**31)))


def _novel_identity(rng: np.random.Generator, novel: HeldOut, avoid: HeldOut,
                    colours: list[str]) -> tuple[str, str, str]:
  """(colour, kind, direction) of a novel clip's first drawn shape: one of `novel`'s
  conditions drawn uniformly, the rest of its identity drawn outside every held-out condition;
  `colours` (the clip's, distinct) is updated so the other shapes keep distinct colours."""
  options = [('pair', p) for p in novel.pairs] + [('motion', m) for m in novel.motions]
  if not options:
    raise ValueError('novel: a HeldOut with no condition')
  what, cond = options[int(rng.integers(len(options)))]
  if what == 'pair':
    colour, kind = cond
    if colour in colours[1:]:          # keep the clip's colours distinct
      colours[colours.index(colour)] = colours[0]
    colours[0] = colour
    free = [x for x in DIRECTIONS if avoid.condition(colour, kind, x) != 'kind-direction']
    return colour, kind, free[int(rng.integers(len(free)))]
  kind, d = cond
  free = [c for c in COLOURS if c not in colours[1:] and
          avoid.condition(c, kind, d) != 'colour-kind']
  colours[0] = free[int(rng.integers(len(free)))]
  return colours[0], kind, d


def _path(rng: np.random.Generator, d: str, half: str, length: float, bounds: tuple,
          mid: float, gap: float) -> tuple[tuple[float, float], tuple[float, float]]:
  """(start, end) centres of a straight path of `length` px moving `d`, inside `bounds`
  (lo_x, hi_x, lo_y, hi_y) and ending in `half`, `gap` px clear of the middle `mid`."""
  lo_x, hi_x, lo_y, hi_y = bounds
  x_lo, x_hi = (lo_x, mid - gap) if half == 'left' else (mid + gap, hi_x)
  if d == 'right':
    x_lo = max(x_lo, lo_x + length)
  elif d == 'left':
    x_hi = min(x_hi, hi_x - length)
  y_lo, y_hi = lo_y, hi_y
  if d == 'down':
    y_lo = lo_y + length
  elif d == 'up':
    y_hi = hi_y - length
  if x_lo > x_hi + 1e-9 or y_lo > y_hi + 1e-9:
    raise AssertionError(f'no room for a path of {length} px ({d}, {half} half)')
  end = (float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi)))
  step = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}[d]
  return (end[0] - step[0] * length, end[1] - step[1] * length), end


_NOISE_POOL = 17  # distinct noise fields cycled over frames (more than any encoder's refs)


@functools.lru_cache(maxsize=4)
def _canvas(width: int, height: int, background: tuple, noise: int, noise_seed: int):
  bg = np.empty((height, width, 3), np.uint8)
  bg[...] = np.asarray(background, np.uint8)
  if not noise:
    return bg, None
  rng = np.random.default_rng(noise_seed)
  pool = rng.integers(-noise, noise + 1, (_NOISE_POOL, height, width, 3), dtype=np.int16)
  return bg, pool


def render_frame(scene: Scene, t: int) -> np.ndarray:
  """uint8 [H, W, 3] RGB of frame t; later shapes are drawn on top of earlier ones."""
  h, w = scene.height, scene.width
  bg, pool = _canvas(w, h, tuple(scene.background), scene.noise, scene.noise_seed)
  img = bg.copy()
  for s in scene.shapes:
    c = s.centre(t, scene.num_frames)
    if c is None:
      continue
    cx, cy = c
    r = s.radius
    y0, y1 = max(0, int(np.floor(cy - r))), min(h, int(np.ceil(cy + r)) + 1)
    x0, x1 = max(0, int(np.floor(cx - r))), min(w, int(np.ceil(cx + r)) + 1)
    if y0 >= y1 or x0 >= x1:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    if s.kind == 'square':
      m = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif s.kind == 'circle':
      m = dx * dx + dy * dy <= r * r
    else:  # triangle pointing up: apex at the top, base at the bottom
      m = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    img[y0:y1, x0:x1][m] = COLOURS[s.colour]
  if pool is not None:
    img = np.clip(img + pool[(7 * t) % _NOISE_POOL], 0, 255).astype(np.uint8)
  return img


def render(scene: Scene) -> np.ndarray:
  """uint8 [T, H, W, 3] of all frames."""
  return np.stack([render_frame(scene, t) for t in range(scene.num_frames)])


def encode_video(path: str, frames, fps, codec: str | None = None, gop: int = 12,
                 preset: str = 'veryfast', crf: int = 23, faststart: bool = False,
                 threads: int = 1, container_format: str = 'mp4') -> str:
  """Encodes uint8 RGB frames [T, H, W, 3] (array or iterable) into a video file at `path`.

  `container_format` is FFmpeg's muxer name ('mp4', 'matroska', ...).
  H and W must be even (yuv420p). `threads` is fixed (not 'auto') so the bytes do not depend
  on the machine's core count; with the same PyAV/FFmpeg build the output is byte-identical
  from run to run (see `yuv420p_frame` and the libx264 options below).
  """
  codec = codec or default_codec()
  fps = _as_fraction(fps)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  options = {'movflags': 'faststart'} if faststart else {}
  it = iter(frames)
  first = next(it, None)
  with av.open(path, 'w', format=container_format, container_options=options) as out:
    stream = out.add_stream(codec, rate=fps)
    if first is not None:
      stream.height, stream.width = first.shape[:2]
    else:
      stream.height, stream.width = 16, 16
    if stream.height % 2 or stream.width % 2:
      raise ValueError(f'frame size {stream.height}x{stream.width} must be even for yuv420p')
    stream.pix_fmt = 'yuv420p'
    stream.codec_context.gop_size = int(gop)
    stream.codec_context.thread_count = int(threads)
    if codec == 'libx264':
      # mbtree=0: with macroblock-tree rate control, libx264's SIMD lookahead gave different
      # bytes from run to run for some frame sizes (e.g. 96 x 64: 3 to 5 distinct outputs in
      # 8 identical runs; asm=0, rc-lookahead=0 or mbtree=0 each made it deterministic).
      stream.options = {'preset': preset, 'crf': str(crf), 'sc_threshold': '0',
                        'keyint_min': str(int(gop)), 'threads': str(int(threads)),
                        'x264-params': 'mbtree=0'}
    elif codec == 'mpeg4':
      stream.codec_context.bit_rate = 2_000_000
    if first is not None:
      for i, img in enumerate(_chain(first, it)):
        frame = yuv420p_frame(img)
        frame.pts = i
        for packet in stream.encode(frame):
          out.mux(packet)
    else:
      out.start_encoding()  # writes the header although no frame follows
    for packet in stream.encode(None):
      out.mux(packet)
  return path


def rgb_to_yuv420p(img: np.ndarray):
  """uint8 RGB [H, W, 3] -> (Y [H, W], Cb [H/2, W/2], Cr [H/2, W/2]) uint8 (BT.601, limited
  range, chroma averaged over 2 x 2 pixels)."""
  h, w, _ = img.shape
  x = img.astype(np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
  cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
  cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
  sub = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))  # noqa: E731
  q = lambda c: np.clip(np.rint(c), 0, 255).astype(np.uint8)          # noqa: E731
  return q(y), q(sub(cb)), q(sub(cr))


def yuv420p_frame(img: np.ndarray) -> av.VideoFrame:
  """An encoder-ready yuv420p frame whose every byte, row padding included, is set.

  The colour conversion is ours (numpy, fixed BT.601 maths) rather than swscale's inside
  `encode`, so the encoder's input does not depend on the FFmpeg build, and the bytes past
  the image width in each row (left uninitialised by PyAV) repeat the row's last pixel.
  """
  frame = av.VideoFrame(img.shape[1], img.shape[0], 'yuv420p')
  for plane, data in zip(frame.planes, rgb_to_yuv420p(img)):
    rows, cols = data.shape
    buf = np.empty((rows, plane.line_size), np.uint8)
    buf[:, :cols] = data
    buf[:, cols:] = data[:, -1:]
    plane.update(buf)
  return frame


def _chain(first, rest):
  yield first
  yield from rest


def write_scene_video(path: str, scene: Scene, codec: str | None = None, gop: int = 12,
                      **kwargs) -> str:
  frames = (render_frame(scene, t) for t in range(scene.num_frames))
  return encode_video(path, frames, scene.fps, codec=codec, gop=gop, **kwargs)


# ------------------------------------------------------------------------------------------
# Annotations

def end_half(scene: Scene, sh: Shape) -> str:
  """'left' or 'right': the half of the frame the shape's path ends in."""
  return 'left' if sh.end[0] < scene.width / 2 else 'right'


def caption(scene: Scene) -> str:
  """What happens, shape by shape in order of appearance."""
  parts, previous = [], None
  for sh in scene.shapes:
    act = f'{_DIRECTION_PHRASE[sh.direction]}, ending in the {end_half(scene, sh)} half'
    if sh.appear == 0:
      parts.append(f'A {sh.name} is there from the start and {act}.')
    elif previous is None:
      parts.append(f'The clip opens empty; then a {sh.name} appears and {act}.')
    elif sh.appear == previous.appear:
      parts.append(f'At the same time a {sh.name} appears and {act}.')
    else:
      parts.append(f'Then a {sh.name} appears and {act}.')
    previous = sh
  n = len(scene.shapes)
  parts.append(f'In total {_NUMBER_WORD.get(n, str(n))} shape{"s" if n > 1 else ""} '
               f'appear{"" if n > 1 else "s"}.')
  return ' '.join(parts)


def questions(scene: Scene, rng: np.random.Generator, name_first: bool = False) -> list[dict]:
  """Temporal questions with a short answer (eval) and a sentence answer (training): for each
  shape its direction, the half it ends in and whether it is visible on the first frame; for a
  clip whose shapes appear on different frames, which of two of them appears first.

  `name_first`: the sentence answers to "is the X visible at the start" and "which half does
  the X end in" begin with the shape's name, the word that decides the answer right after it
  ("The red circle is there from the first frame." / "The red circle only appears later in the
  video."; "The red circle ends in the left half."), as the direction sentence does. Short
  answers and questions do not change.
  """
  qs = []
  for sh in scene.shapes:
    half = end_half(scene, sh)
    qs.append({'type': 'direction',
               'question': f'In which direction does the {sh.name} move?',
               'answer': sh.direction,
               'sentence': f'The {sh.name} {_DIRECTION_PHRASE[sh.direction]}.'})
    qs.append({'type': 'end_position',
               'question': f'At the end of the video, is the {sh.name} in the left or the right '
                           f'half of the frame?',
               'answer': half,
               'sentence': (f'The {sh.name} ends in the {half} half.' if name_first
                            else f'By the end it is in the {half} half.')})
    present = sh.appear == 0
    lead = f'The {sh.name}' if name_first else ('Yes, it' if present else 'No, it')
    qs.append({'type': 'at_start',
               'question': f'Is the {sh.name} visible at the start of the video?',
               'answer': 'yes' if present else 'no',
               'sentence': (f'{lead} is there from the first frame.' if present else
                            f'{lead} only appears later in the video.')})
  pairs = [(i, j) for i in range(len(scene.shapes)) for j in range(i + 1, len(scene.shapes))
           if scene.shapes[i].appear != scene.shapes[j].appear]
  if pairs:
    i, j = pairs[int(rng.integers(len(pairs)))]
    a, b = scene.shapes[i], scene.shapes[j]             # a appears before b
    pair = (a, b) if rng.random() < 0.5 else (b, a)
    qs.append({'type': 'order',
               'question': f'Which appears first, the {pair[0].name} or the {pair[1].name}?',
               'answer': f'the {a.name}',
               'sentence': f'The {a.name} appears first; the {b.name} comes later.'})
  return qs


# The LLaVA-style answer-format instruction: a question carrying it is answered with the short
# answer ('left', 'yes', 'the red circle') instead of a sentence.
SHORT_ANSWER_PROMPT = 'Answer with a single word or phrase.'

_CAPTION_PROMPTS = (
    'Describe the video briefly.',
    'What happens in this video?',
    'Give a short description of the clip.',
    'Summarise the motion in the video.',
)


def _balanced_order(qs: list[dict], n: int, rng: np.random.Generator) -> list[int]:
  """`n` distinct question indices, each drawn by a uniform type, then a uniform question of
  that type among those not yet drawn."""
  left = list(range(len(qs)))
  return [_draw_by_type(qs, left, rng) for _ in range(n)]


def _draw_by_type(qs: list[dict], left: list[int], rng: np.random.Generator) -> int:
  """Removes from `left` and returns a question index drawn by a uniform type among those
  left, then uniformly among that type's questions."""
  types = sorted({qs[k]['type'] for k in left})
  t = types[int(rng.integers(len(types)))]
  of_type = [k for k in left if qs[k]['type'] == t]
  k = of_type[int(rng.integers(len(of_type)))]
  left.remove(k)
  return k


PER_SHAPE_TYPES = ('direction', 'end_position', 'at_start')   # `questions`' order per shape
TYPES = PER_SHAPE_TYPES + ('order',)


def _short_first_turn(question: str, video_after_question: bool) -> str:
  """A conversation's first question asked in the short form: the video first, or (with
  `video_after_question`) between the question and the answer-format instruction."""
  if video_after_question:
    return f'{question}\n<video>\n{SHORT_ANSWER_PROMPT}'
  return f'<video>\n{question}\n{SHORT_ANSWER_PROMPT}'


def _rel(root: str, path: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, '/')


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  root: str
  train_videos: tuple[str, ...]     # absolute paths
  eval_videos: tuple[str, ...]      # the test split
  train_captions: str               # stage 1-2 conversations
  train_instruct: str               # stage 3 conversations
  eval_qa: str                      # Video-ChatGPT style questions on the test split
  scenes: str                       # ground truth per clip
  train_focus: str = ''             # `focus_types`' conversations alone ('' without them)
  val_videos: tuple[str, ...] = ()  # the validation split (`val_clips`)
  val_qa: str = ''
  novel_videos: tuple[str, ...] = ()   # clips with a held-out condition (`novel_clips`)
  novel_qa: str = ''


def _eval_entries(name: str, scene: Scene, qs: list[dict], video_after_question: bool,
                  eval_instruction: str, held_out: HeldOut | None, novel: bool) -> list[dict]:
  """The VideoQA records of one evaluation clip; on a `novel` clip only the questions about its
  shape with a held-out condition, each with that `condition`."""
  out = []
  for k, q in enumerate(qs):
    entry = {'video_name': name, 'question_id': f'{name}_{k}', 'answer': q['answer'],
             'type': q['type'],
             'question': q['question'] + ('\n<video>' if video_after_question else '') + (
                 '\n' + eval_instruction if eval_instruction else '')}
    if novel:
      conds = [held_out.condition(sh.colour, sh.kind, sh.direction) for sh in scene.shapes
               if f'the {sh.name}' in q['question']]
      if not any(conds):
        continue
      entry['condition'] = next(c for c in conds if c)
    out.append(entry)
  return out


def _training_entries(name: str, rel: str, scene: Scene, qs: list[dict],
                      rng: np.random.Generator, type_rng: np.random.Generator,
                      short_rng: np.random.Generator, focus_rng: np.random.Generator, *,
                      turns: int, short_fraction: float, balance_types: bool,
                      video_after_question: bool, focus_types: Sequence[str]):
  """One training clip's caption conversation, question conversation and focus conversations
  (`make_dataset` says what each option does; each draw has its own stream, so an option
  leaves the others' draws as they were)."""
  prompt = _CAPTION_PROMPTS[int(rng.integers(len(_CAPTION_PROMPTS)))]
  caption_entry = {'id': name, 'video': rel, 'conversations': [
      {'from': 'human', 'value': f'<video>\n{prompt}'},
      {'from': 'gpt', 'value': caption(scene)}]}
  if balance_types:
    order = _balanced_order(qs, min(turns, len(qs)), type_rng)
  else:
    order = rng.permutation(len(qs))[:min(turns, len(qs))]
  short = (short_rng.random(len(order)) < short_fraction if short_fraction > 0
           else np.zeros(len(order), bool))
  conv = []
  for t, q in enumerate(qs[int(k)] for k in order):
    if t == 0 and short[t]:
      ask = _short_first_turn(q['question'], video_after_question)
    else:
      ask = ('<video>\n' if t == 0 else '') + q['question']
      if short[t]:
        ask += '\n' + SHORT_ANSWER_PROMPT
    conv.append({'from': 'human', 'value': ask})
    conv.append({'from': 'gpt', 'value': q['answer'] if short[t] else q['sentence']})
  focus = []
  if focus_types and len(scene.shapes) >= 2:
    for t in focus_types:
      of_type = [q for q in qs if q['type'] == t]
      if not of_type:                  # "which appears first" when all appear together
        continue
      q = of_type[int(focus_rng.integers(len(of_type)))]
      focus.append({'id': f'{name}_{t}', 'video': rel, 'conversations': [
          {'from': 'human', 'value': _short_first_turn(q['question'], video_after_question)},
          {'from': 'gpt', 'value': q['answer']}]})
  return caption_entry, {'id': name, 'video': rel, 'conversations': conv}, focus


def make_dataset(root: str, num_videos: int, seed: int = 0, eval_fraction: float = 0.25,
                 width: int = 160, height: int = 120, fps=10, duration_s: float = 3.0,
                 codec: str | None = None, gop: int = 12, max_shapes: int = 3,
                 preset: str = 'veryfast', turns: int = 3, short_fraction: float = 0.0,
                 eval_instruction: str = '', progress: bool = False,
                 travel: float = 1.0, balance_types: bool = False, size: float = 0.1,
                 video_after_question: bool = False, name_first: bool = False,
                 focus_types: Sequence[str] = (), val_clips: int = 0, novel_clips: int = 0,
                 held_out: HeldOut | None = None) -> SyntheticDataset:
  """Writes the clips under `root/videos` plus the annotation files; returns paths.

  Splits, each drawn from `seed` and the clip's index, disjoint: of `num_videos`, the last
  `round(eval_fraction * num_videos)` (at least one when num_videos >= 2 and eval_fraction > 0)
  are the test split (`eval_qa.json`); the rest are training clips. `val_clips` more clips make
  the validation split (`val_qa.json`) and `novel_clips` more (`novel_qa.json`, which needs
  `held_out`) each show one of `held_out`'s conditions on one shape, asked only about that
  shape. With `held_out`, no training, validation or test clip shows any of its conditions.
  `turns` questions of each training clip go into its `train_instruct.json` conversation; each
  is asked in the short form (the question followed by `SHORT_ANSWER_PROMPT`, answered with the
  short answer) with probability `short_fraction`, else answered with a sentence.
  `eval_instruction` is appended to every evaluation question on a new line (e.g.
  `SHORT_ANSWER_PROMPT`). `travel` and `size` are `random_scene`'s. `balance_types`: a
  training turn first draws a question type uniformly among the clip's types, then a question
  of that type (else every question of the clip is equally likely). `video_after_question`: the
  evaluation questions and a training conversation's first question, when it is asked in the
  short form, put the video between the question and the answer-format instruction
  ("Q\\n<video>\\nAnswer with ..."); a sentence-form first turn keeps the video first.
  `name_first`: see `questions`. `focus_types` (of `TYPES`): besides its conversation, every
  training clip of two or more shapes gets, per focus type, a single-turn short-form
  conversation about one of its shapes drawn at random (its own id `<clip>_<type>`), added to
  `train_instruct.json` and also written alone to `train_focus.json`. `progress` shows a
  progress bar.
  """
  for t in focus_types:
    if t not in TYPES:
      raise ValueError(f'focus type {t!r}; expected one of {TYPES}')
  if not 0.0 <= short_fraction <= 1.0:
    raise ValueError(f'short_fraction={short_fraction} must be in [0, 1]')
  if turns < 1:
    raise ValueError(f'turns={turns} must be >= 1')
  if num_videos < 1:
    raise ValueError('num_videos must be >= 1')
  if val_clips < 0 or novel_clips < 0:
    raise ValueError(f'val_clips={val_clips} and novel_clips={novel_clips} must be >= 0')
  if novel_clips and held_out is None:
    raise ValueError(f'novel_clips={novel_clips} needs held_out (the conditions they show)')
  root = os.path.abspath(root)
  vdir = os.path.join(root, 'videos')
  os.makedirs(vdir, exist_ok=True)
  n_eval = int(round(eval_fraction * num_videos))
  if eval_fraction > 0 and num_videos >= 2:
    n_eval = max(1, n_eval)
  n_eval = min(n_eval, num_videos - 1) if num_videos >= 2 else 0
  n_train = num_videos - n_eval
  split = (['train'] * n_train + ['test'] * n_eval + ['val'] * val_clips +
           ['novel'] * novel_clips)

  captions, instruct, scenes, focus = [], [], {}, []
  qa = {'test': [], 'val': [], 'novel': []}
  paths = {'train': [], 'test': [], 'val': [], 'novel': []}
  from tqdm import tqdm
  for i in tqdm(range(len(split)), desc='synthetic clips', unit='clip', disable=not progress):
    rng = np.random.default_rng([seed, i])
    scene = random_scene(rng, width=width, height=height, fps=fps, duration_s=duration_s,
                         max_shapes=max_shapes, travel=travel, size=size,
                         exclude=held_out if split[i] != 'novel' else None,
                         novel=held_out if split[i] == 'novel' else None)
    name = f'vid_{i:05d}'
    path = os.path.join(vdir, name + '.mp4')
    write_scene_video(path, scene, codec=codec, gop=gop, preset=preset)
    scenes[name] = dict(scene.to_json(), split=split[i])
    paths[split[i]].append(path)
    rel = _rel(root, path)
    qs = questions(scene, rng, name_first=name_first)
    if split[i] != 'train':
      qa[split[i]] += _eval_entries(name, scene, qs, video_after_question, eval_instruction,
                                    held_out, split[i] == 'novel')
      continue
    caption_entry, conv_entry, focus_entries = _training_entries(
        name, rel, scene, qs, rng, np.random.default_rng([seed, i, 2]),
        np.random.default_rng([seed, i, 1]), np.random.default_rng([seed, i, 4]),
        turns=turns, short_fraction=short_fraction, balance_types=balance_types,
        video_after_question=video_after_question, focus_types=focus_types)
    captions.append(caption_entry)
    instruct.append(conv_entry)
    focus += focus_entries
    instruct += focus_entries

  files = {}
  written = [('train_captions', captions), ('train_instruct', instruct),
             ('eval_qa', qa['test']), ('scenes', scenes)]
  written += [('train_focus', focus)] if focus_types else []
  written += [('val_qa', qa['val'])] if val_clips else []
  written += [('novel_qa', qa['novel'])] if novel_clips else []
  for key, data in written:
    files[key] = os.path.join(root, key + '.json')
    with open(files[key], 'w') as f:
      json.dump(data, f, indent=1, sort_keys=True)
  return SyntheticDataset(root=root, train_videos=tuple(paths['train']),
                          eval_videos=tuple(paths['test']), val_videos=tuple(paths['val']),
                          novel_videos=tuple(paths['novel']), **files)


# ------------------------------------------------------------------------------------------
# Broken files

def write_broken_files(directory: str, seed: int = 0, codec: str | None = None) -> dict:
  """Writes files a video loader must reject cleanly; returns {case: path}.

  truncated           valid MP4 (index at the end) cut to 40 % of its bytes: no index
  truncated_data      MP4 with the index at the front (faststart) cut to 60 %: the index
                      promises frames whose bytes are missing
  corrupt             valid MP4 whose first 4 KiB (headers) are random bytes
  empty               zero bytes
  not_video           a text file named .mp4
  zero_frames         an AVI file with a video stream and no frames (opens fine)
  audio_only          an MP4 with one audio stream and no video
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  scene = random_scene(np.random.default_rng([seed, 1]), width=96, height=64, fps=10,
                       duration_s=3.0, num_shapes=1)
  frames = render(scene)
  paths = {}

  good = os.path.join(directory, '_good.mp4')
  encode_video(good, frames, scene.fps, codec=codec, gop=10)
  data = open(good, 'rb').read()
  paths['truncated'] = os.path.join(directory, 'truncated.mp4')
  with open(paths['truncated'], 'wb') as f:
    f.write(data[:int(len(data) * 0.4)])

  fast = os.path.join(directory, '_fast.mp4')
  encode_video(fast, frames, scene.fps, codec=codec, gop=10, faststart=True)
  fdata = open(fast, 'rb').read()
  paths['truncated_data'] = os.path.join(directory, 'truncated_data.mp4')
  with open(paths['truncated_data'], 'wb') as f:
    f.write(fdata[:int(len(fdata) * 0.6)])

  paths['corrupt'] = os.path.join(directory, 'corrupt.mp4')
  bad = bytearray(data)
  n = min(4096, len(bad))
  bad[:n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
  with open(paths['corrupt'], 'wb') as f:
    f.write(bytes(bad))

  paths['empty'] = os.path.join(directory, 'empty.mp4')
  open(paths['empty'], 'wb').close()

  paths['not_video'] = os.path.join(directory, 'not_video.mp4')
  with open(paths['not_video'], 'w') as f:
    f.write('this is not a video\n' * 20)

  # The MP4 muxer drops a track without samples; AVI keeps it and opens with zero packets.
  paths['zero_frames'] = os.path.join(directory, 'zero_frames.avi')
  encode_video(paths['zero_frames'], [], 10, codec=codec, container_format='avi')

  paths['audio_only'] = os.path.join(directory, 'audio_only.mp4')
  with av.open(paths['audio_only'], 'w', format='mp4') as out:
    stream = out.add_stream('aac', rate=16000)
    t = np.arange(16000) / 16000
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    frame = av.AudioFrame.from_ndarray(samples, format='flt', layout='mono')
    frame.sample_rate = 16000
    for packet in stream.encode(frame):
      out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)

  os.remove(good)
  os.remove(fast)
  return paths
