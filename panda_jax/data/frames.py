"""Host-side frame geometry: aspect-preserving size, square padding and validity mask.

Spec section 2. The teacher works at 224 px in 14-px patches (a 16 x 16 grid); the student at
twice that (448 px). A frame's long side becomes the full size; its short side becomes a whole
number of teacher patches, `ceil(16 * short / long)`, and the padding around it is a whole
number of patches on each side, the smaller half first. The student's sizes are exactly twice
the teacher's, so both see the same geometry and every student size is a multiple of 28 px.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# The reference pads in 8-bit colour with int(255 * mean) before normalising.
PAD_RGB = np.floor(255 * CLIP_MEAN).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
  """Where a frame of a given aspect lands on the square canvas, in pixels."""
  height: int      # resized content height
  width: int       # resized content width
  top: int         # padding rows above
  left: int        # padding columns on the left
  size: int        # canvas side


def frame_geometry(height: int, width: int, size: int = 448, teacher_size: int = 224,
                   patch: int = 14) -> FrameGeometry:
  """Content size and padding of an `height x width` frame on a `size` square canvas.

  `size` must be an integer multiple of `teacher_size` (2 for the student, 1 for the teacher).
  """
  if height <= 0 or width <= 0:
    raise ValueError(f'frame size {height}x{width}: both sides must be positive')
  if size % teacher_size or teacher_size % patch:
    raise ValueError(f'size={size} must be a multiple of teacher_size={teacher_size}, itself '
                     f'a multiple of patch={patch}')
  scale = size // teacher_size
  grid = teacher_size // patch
  long, short = max(height, width), min(height, width)
  n = min(grid, -(-grid * short // long))          # ceil(grid * short / long), exact
  n = max(n, 1)
  before = (grid - n) // 2
  content = n * patch * scale
  pad = before * patch * scale
  if height >= width:
    return FrameGeometry(height=size, width=content, top=0, left=pad, size=size)
  return FrameGeometry(height=content, width=size, top=pad, left=0, size=size)


def pad(frames: np.ndarray, geom: FrameGeometry) -> np.ndarray:
  """Resized uint8 frames [F, h, w, 3] placed on the uint8 canvas [F, S, S, 3], padded with
  `PAD_RGB` (the reference pads in 8-bit colour, before normalising)."""
  f, h, w, _ = frames.shape
  if (h, w) != (geom.height, geom.width):
    raise ValueError(f'frames are {h}x{w}, geometry expects {geom.height}x{geom.width}')
  canvas = np.empty((f, geom.size, geom.size, 3), np.uint8)
  canvas[:] = PAD_RGB
  canvas[:, geom.top:geom.top + h, geom.left:geom.left + w] = frames
  return canvas


def content_mask(geom: FrameGeometry, frames: int) -> np.ndarray:
  """float32 [frames, S, S]: 1 on the real pixels of `geom`'s canvas, 0 on the padding."""
  mask = np.zeros((frames, geom.size, geom.size), np.float32)
  mask[:, geom.top:geom.top + geom.height, geom.left:geom.left + geom.width] = 1
  return mask


# Every normalised value a uint8 channel can take, computed once with the float32 operations
# `(x / 255 - mean) / std` would do per pixel: looking them up gives the same bits in half the
# time (`tests/test_frames.py`).
_NORMALISED = (np.arange(256, dtype=np.float32)[:, None] / 255.0 - CLIP_MEAN) / CLIP_STD


def normalise(canvas: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3] normalised with the CLIP mean and std per channel."""
  if canvas.dtype != np.uint8 or canvas.shape[-1] != 3:
    raise ValueError(f'expected uint8 [..., 3] pixels, got {canvas.dtype} {canvas.shape}')
  out = np.empty(canvas.shape, np.float32)
  for c in range(3):
    np.take(_NORMALISED[:, c], canvas[..., c], out=out[..., c])
  return out


def pad_and_normalise(frames: np.ndarray, geom: FrameGeometry):
  """Places resized uint8 frames [F, h, w, 3] on the canvas.

  Returns (pixels float32 [F, S, S, 3] normalised with the CLIP mean/std, mask float32
  [F, S, S] with 1 on real pixels).
  """
  canvas = pad(frames, geom)
  return normalise(canvas), content_mask(geom, len(frames))


def moving_square(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  """uint8 [F, H, W, 3]: a coloured square moving left to right on a dark background."""
  rng = np.random.default_rng(seed)
  out = np.full((frames, height, width, 3), 20, np.uint8)
  side = max(2, min(height, width) // 4)
  color = rng.integers(80, 256, 3).astype(np.uint8)
  top = (height - side) // 2
  for t in range(frames):
    left = int(round((width - side) * t / max(frames - 1, 1)))
    out[t, top:top + side, left:left + side] = color
  return out
