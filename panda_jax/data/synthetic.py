"""Deterministic synthetic video data: real encoded clips of moving coloured shapes.

Each clip shows one to `max_shapes` coloured shapes (square, circle, triangle) on a plain
background. Every shape moves in a straight line in one direction (left, right, up or down)
from its appearance to the end of the clip; the first shape is there from frame 0, the others
appear later, one after another, so "which appears first" and "where does it move" are
questions that need more than one frame. Everything is drawn from `seed`: the same seed gives
the same scenes, the same annotation files and, with the same PyAV/FFmpeg build, the same
bytes.

The clips are encoded by PyAV into MP4: H.264 (`libx264`) where PyAV's FFmpeg has it,
otherwise MPEG-4 part 2 (`mpeg4`). `gop` sets the keyframe interval (scene-cut keyframes are
disabled for libx264, so keyframes are exactly every `gop` frames).

Annotation files written by `make_dataset` (paths relative to `root`):

* `train_captions.json` - stages 1-2: one caption conversation per training clip.
* `train_instruct.json` - stage 3: multi-turn question/answer conversations per training
  clip. Both in the LLaVA/Video-ChatGPT training format
  `[{"id", "video": relpath, "conversations": [{"from": "human", "value": "<video>\\n..."},
  {"from": "gpt", "value": ...}, ...]}]`.
* `eval_qa.json` - held-out VideoQA on clips that are not in the training files, in the
  Video-ChatGPT question style `[{"video_name", "question", "question_id", "answer"}]`
  (`video_name` is the file stem; the file is `videos/<video_name>.mp4`). Every question
  needs temporal information: direction of motion, order of appearance, or what is visible
  at the start / end.
* `scenes.json` - the ground truth of every clip (shapes, colours, directions, appearance
  frames, start/end centres) for tests and analysis.

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


def random_scene(rng: np.random.Generator, width: int = 160, height: int = 120, fps=10,
                 duration_s: float = 3.0, max_shapes: int = 3, num_shapes: int | None = None,
                 directions: Sequence[str] | None = None, noise: int = 0,
                 travel: float = 1.0, size: float = 0.1, min_shapes: int = 1,
                 late_start: float = 0.0) -> Scene:
  """A random scene; `num_shapes` / `directions` pin those choices (for tests).

  `noise` > 0 adds deterministic per-frame noise of that amplitude (in 8-bit levels), which
  makes the clips cost about as much to decode as camera footage instead of almost nothing.
  `travel` < 1 slows the shapes down: every shape moves at the same speed, covering that
  fraction of the frame's free span over the whole clip (less when it appears later), and
  ends at the edge it moves towards. 1.0: each shape crosses the whole span, whenever it
  appears. `size`: a shape's half-size as a fraction of the frame's shorter side. The number
  of shapes is uniform in [min_shapes, max_shapes] unless `num_shapes` pins it. `late_start`:
  the probability that the clip opens empty (every shape enters one frame later, so the first
  frame shows only the background); 0 draws nothing, so it changes no other scene.
  """
  if not 0.0 < travel <= 1.0:
    raise ValueError(f'travel={travel} must be in (0, 1]')
  if not 0.0 < size <= 0.25:
    raise ValueError(f'size={size} must be in (0, 0.25]')
  fps = _as_fraction(fps)
  num_frames = max(1, int(round(float(fps) * duration_s)))
  if not 1 <= min_shapes <= max_shapes:
    raise ValueError(f'min_shapes={min_shapes} must be in [1, max_shapes={max_shapes}]')
  k = (int(num_shapes) if num_shapes is not None else
       int(rng.integers(min_shapes, max_shapes + 1)))
  if not 1 <= k <= len(COLOURS):
    raise ValueError(f'num_shapes={k} must be in [1, {len(COLOURS)}]')
  colours = rng.choice(list(COLOURS), size=k, replace=False)
  bg = tuple(int(v) for v in rng.integers(10, 50, 3))
  radius = max(2, int(min(width, height) * size))
  # Appearance frames: 0 for the first, then strictly increasing inside the first 70 %.
  if k > 1 and num_frames >= 2 * k:
    later = np.sort(rng.choice(np.arange(max(1, num_frames // 5), max(2, 7 * num_frames // 10)),
                               size=k - 1, replace=False))
  else:
    later = np.arange(1, k)
  appear = [0] + [int(a) for a in later]
  if late_start > 0:
    if not 0.0 <= late_start <= 1.0:
      raise ValueError(f'late_start={late_start} must be in [0, 1]')
    late_rng = np.random.default_rng(rng.integers(2**31))
    if late_rng.random() < late_start and appear[-1] + 1 < num_frames - 1:
      appear = [a + 1 for a in appear]
  shapes = []
  for i in range(k):
    d = directions[i] if directions is not None else DIRECTIONS[int(rng.integers(4))]
    if d not in DIRECTIONS:
      raise ValueError(f'direction {d!r} not in {DIRECTIONS}')
    lo_x, hi_x = radius + 1, width - radius - 2
    lo_y, hi_y = radius + 1, height - radius - 2
    # Travel across most of the frame along the motion axis; random position across it.
    if d in ('left', 'right'):
      y = float(rng.uniform(lo_y, hi_y))
      xs = (lo_x, hi_x) if d == 'right' else (hi_x, lo_x)
      xs = _slowed(xs, travel, appear[i], num_frames)
      start, end = (float(xs[0]), y), (float(xs[1]), y)
    else:
      x = float(rng.uniform(lo_x, hi_x))
      ys = (lo_y, hi_y) if d == 'down' else (hi_y, lo_y)
      ys = _slowed(ys, travel, appear[i], num_frames)
      start, end = (x, float(ys[0])), (x, float(ys[1]))
    shapes.append(Shape(kind=KINDS[int(rng.integers(len(KINDS)))], colour=str(colours[i]),
                        radius=radius, direction=d, appear=appear[i], start=start, end=end))
  return Scene(width=width, height=height, fps=fps, num_frames=num_frames, background=bg,
               shapes=tuple(shapes), noise=int(noise), noise_seed=int(rng.integers(2**31)))


def _slowed(ends: tuple[float, float], travel: float, appear: int, num_frames: int):
  """(start, end) along the motion axis for `random_scene`'s `travel`: the same end, a start
  `travel` of the span per clip back along the way, in proportion to the frames left."""
  if travel >= 1.0:
    return ends
  left = max(num_frames - 1 - appear, 1) / max(num_frames - 1, 1)
  a, b = ends
  return (b - (b - a) * travel * left, b)


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

def caption(scene: Scene) -> str:
  s = scene.shapes
  parts = [f'A {s[0].name} {_DIRECTION_PHRASE[s[0].direction]} across a dark background.']
  for i, sh in enumerate(s[1:]):
    lead = 'Then' if i == 0 else 'After that,'
    parts.append(f'{lead} a {sh.name} appears and {_DIRECTION_PHRASE[sh.direction]}.')
  n = len(s)
  parts.append(f'In total {_NUMBER_WORD.get(n, str(n))} shape{"s" if n > 1 else ""} '
               f'appear{"" if n > 1 else "s"}.')
  return ' '.join(parts)


def _end_side(sh: Shape) -> str:
  return {'left': 'left', 'right': 'right', 'up': 'top', 'down': 'bottom'}[sh.direction]


def questions(scene: Scene, rng: np.random.Generator, name_first: bool = False) -> list[dict]:
  """Temporal questions with a short answer (eval) and a sentence answer (training).

  `name_first`: the sentence answers to "is the X visible at the start" and "which edge is
  the X nearest at the end" begin with the shape's name, and the word that decides the answer
  follows the name at once ("The red circle is there from the first frame." / "The red circle
  only appears later in the video."; "The red circle ends near the left edge."): the decision
  is then made right after the name instead of at a template token far from it (the direction
  sentence has this form already; docs/changelog.md: the decision is still one fetch away from the colour
  word, which is what the demo's decoder finds hard). Short answers and questions do not
  change.
  """
  qs = []
  for sh in scene.shapes:
    qs.append({'type': 'direction',
               'question': f'In which direction does the {sh.name} move?',
               'answer': sh.direction,
               'sentence': f'The {sh.name} {_DIRECTION_PHRASE[sh.direction]}.'})
    qs.append({'type': 'end_position',
               'question': f'At the end of the video, is the {sh.name} nearer the left, right, '
                           f'top or bottom edge?',
               'answer': _end_side(sh),
               'sentence': (f'The {sh.name} ends near the {_end_side(sh)} edge.' if name_first
                            else f'By the end it is near the {_end_side(sh)} edge.')})
    present = sh.appear == 0
    lead = f'The {sh.name}' if name_first else ('Yes, it' if present else 'No, it')
    qs.append({'type': 'at_start',
               'question': f'Is the {sh.name} visible at the start of the video?',
               'answer': 'yes' if present else 'no',
               'sentence': (f'{lead} is there from the first frame.' if present else
                            f'{lead} only appears later in the video.')})
  if len(scene.shapes) >= 2:
    i, j = sorted(rng.choice(len(scene.shapes), size=2, replace=False))
    a, b = scene.shapes[i], scene.shapes[j]
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


def _paired_order(qs: list[dict], n: int, num_shapes: int, rng: np.random.Generator) -> list[int]:
  """As `_balanced_order`, but a per-shape question drawn on a clip of several shapes is
  followed (while turns are left) by the same question about another of its shapes, so the
  two turns differ only in the shape named and, mostly, in the answer."""
  per = len(PER_SHAPE_TYPES)
  left = list(range(len(qs)))
  chosen = []
  while len(chosen) < n and left:
    k = _draw_by_type(qs, left, rng)
    chosen.append(k)
    if qs[k]['type'] in PER_SHAPE_TYPES and num_shapes >= 2 and len(chosen) < n:
      others = [s * per + k % per for s in range(num_shapes) if s != k // per]
      others = [o for o in others if o in left]
      if others:
        o = others[int(rng.integers(len(others)))]
        chosen.append(o)
        left.remove(o)
  return chosen


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
  eval_videos: tuple[str, ...]
  train_captions: str               # stage 1-2 conversations
  train_instruct: str               # stage 3 conversations
  eval_qa: str                      # Video-ChatGPT style held-out questions
  scenes: str                       # ground truth per clip
  train_focus: str = ''             # `focus_types`' conversations alone ('' without them)


def make_dataset(root: str, num_videos: int, seed: int = 0, eval_fraction: float = 0.25,
                 width: int = 160, height: int = 120, fps=10, duration_s: float = 3.0,
                 codec: str | None = None, gop: int = 12, max_shapes: int = 3,
                 preset: str = 'veryfast', turns: int = 3, short_fraction: float = 0.0,
                 eval_instruction: str = '', progress: bool = False,
                 travel: float = 1.0, balance_types: bool = False,
                 size: float = 0.1, min_shapes: int = 1,
                 late_start: float = 0.0,
                 video_after_question: bool = False,
                 pair_shapes: bool = False, name_first: bool = False,
                 focus_types: Sequence[str] = ()) -> SyntheticDataset:
  """Writes `num_videos` clips under `root/videos` plus the annotation files; returns paths.

  The last `round(eval_fraction * num_videos)` clips (at least one when num_videos >= 2 and
  eval_fraction > 0) are held out for `eval_qa.json` and appear in no training file.
  `turns` questions of each training clip go into its `train_instruct.json` conversation; each
  is asked in the short form (the question followed by `SHORT_ANSWER_PROMPT`, answered with the
  short answer) with probability `short_fraction`, else answered with a sentence.
  `eval_instruction` is appended to every held-out question on a new line (e.g.
  `SHORT_ANSWER_PROMPT`). `travel`, `size`, `min_shapes` and `late_start` are
  `random_scene`'s. `balance_types`: a training turn first
  draws a question type uniformly among the clip's types, then a question of that type (else
  every question of the clip is equally likely, so a two-shape clip asks "which appears first"
  once in seven). `video_after_question`: the held-out questions and a training
  conversation's first question, when it is asked in the short form, put the video between the
  question and the answer-format instruction ("Q\\n<video>\\nAnswer with ..."), so the
  decoder reads the question before the visual tokens (a sentence-form first turn keeps the video
  first: the reference moves a trailing placeholder to the front). `pair_shapes` (draws by type
  as `balance_types`): on a clip of two or more shapes, a turn asking about one shape's
  direction, end position or presence at the start is followed by the same question about
  another shape. `name_first`: see `questions`. `focus_types` (of `TYPES`): besides its
  conversation, every training clip of two or more shapes gets, per focus type, a single-turn
  short-form conversation about one of its shapes drawn at random (its own id
  `<clip>_<type>`): a question whose answer depends on which shape is named, asked alone
  (with `video_after_question`, in that layout).
  They are added to `train_instruct.json` and also written alone to `train_focus.json`.
  `progress` shows a progress bar.
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
  root = os.path.abspath(root)
  vdir = os.path.join(root, 'videos')
  os.makedirs(vdir, exist_ok=True)
  n_eval = int(round(eval_fraction * num_videos))
  if eval_fraction > 0 and num_videos >= 2:
    n_eval = max(1, n_eval)
  n_eval = min(n_eval, num_videos - 1) if num_videos >= 2 else 0
  n_train = num_videos - n_eval

  captions, instruct, eval_qa, scenes, focus = [], [], [], {}, []
  train_paths, eval_paths = [], []
  from tqdm import tqdm
  for i in tqdm(range(num_videos), desc='synthetic clips', unit='clip', disable=not progress):
    rng = np.random.default_rng([seed, i])
    scene = random_scene(rng, width=width, height=height, fps=fps, duration_s=duration_s,
                         max_shapes=max_shapes, travel=travel, size=size,
                         min_shapes=min_shapes, late_start=late_start)
    name = f'vid_{i:05d}'
    path = os.path.join(vdir, name + '.mp4')
    write_scene_video(path, scene, codec=codec, gop=gop, preset=preset)
    scenes[name] = scene.to_json()
    rel = _rel(root, path)
    qs = questions(scene, rng, name_first=name_first)
    if i < n_train:
      train_paths.append(path)
      prompt = _CAPTION_PROMPTS[int(rng.integers(len(_CAPTION_PROMPTS)))]
      captions.append({'id': name, 'video': rel, 'conversations': [
          {'from': 'human', 'value': f'<video>\n{prompt}'},
          {'from': 'gpt', 'value': caption(scene)}]})
      if pair_shapes:
        order = _paired_order(qs, min(turns, len(qs)), len(scene.shapes),
                              np.random.default_rng([seed, i, 3]))
      elif balance_types:
        order = _balanced_order(qs, min(turns, len(qs)),
                                np.random.default_rng([seed, i, 2]))
      else:
        order = rng.permutation(len(qs))[:min(turns, len(qs))]
      # A separate stream, so the default (all sentences) keeps the files it always wrote.
      short = (np.random.default_rng([seed, i, 1]).random(len(order)) < short_fraction
               if short_fraction > 0 else np.zeros(len(order), bool))
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
      instruct.append({'id': name, 'video': rel, 'conversations': conv})
      if focus_types and len(scene.shapes) >= 2:
        focus_rng = np.random.default_rng([seed, i, 4])    # leaves the other draws as they were
        for t in focus_types:
          of_type = [q for q in qs if q['type'] == t]
          q = of_type[int(focus_rng.integers(len(of_type)))]
          focus.append({'id': f'{name}_{t}', 'video': rel, 'conversations': [
              {'from': 'human', 'value': _short_first_turn(q['question'], video_after_question)},
              {'from': 'gpt', 'value': q['answer']}]})
          instruct.append(focus[-1])
    else:
      eval_paths.append(path)
      for k, q in enumerate(qs):
        ask = q['question'] + ('\n<video>' if video_after_question else '') + (
            '\n' + eval_instruction if eval_instruction else '')
        eval_qa.append({'video_name': name, 'question': ask,
                        'question_id': f'{name}_{k}', 'answer': q['answer'],
                        'type': q['type']})

  files = {}
  written = [('train_captions', captions), ('train_instruct', instruct), ('eval_qa', eval_qa),
             ('scenes', scenes)] + ([('train_focus', focus)] if focus_types else [])
  for key, data in written:
    files[key] = os.path.join(root, key + '.json')
    with open(files[key], 'w') as f:
      json.dump(data, f, indent=1, sort_keys=True)
  return SyntheticDataset(root=root, train_videos=tuple(train_paths),
                          eval_videos=tuple(eval_paths), **files)


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
