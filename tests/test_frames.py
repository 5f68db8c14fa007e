"""Frame geometry on the host (spec section 2)."""

import numpy as np
import pytest

from panda_jax.data.frames import (CLIP_MEAN, CLIP_STD, PAD_RGB, FrameGeometry, frame_geometry,
                                   moving_square, normalise, pad_and_normalise)


@pytest.mark.parametrize('h,w,want', [
    (360, 640, FrameGeometry(252, 448, 84, 0, 448)),     # 16:9 landscape: 18 x 32 patches
    (640, 360, FrameGeometry(448, 252, 0, 84, 448)),     # portrait
    (500, 500, FrameGeometry(448, 448, 0, 0, 448)),      # square
    (480, 640, FrameGeometry(336, 448, 56, 0, 448)),     # 4:3
    (100, 90, FrameGeometry(448, 420, 0, 0, 448)),       # 15 patches: the smaller half first
    (3, 4000, FrameGeometry(28, 448, 196, 0, 448)),      # extreme: at least one teacher patch
])
def test_student_geometry(h, w, want):
  g = frame_geometry(h, w)
  assert g == want
  for v in (g.height, g.width, g.top, g.left):
    assert v % 28 == 0
  t = frame_geometry(h, w, size=224)
  assert (t.height * 2, t.width * 2, t.top * 2, t.left * 2) == (g.height, g.width, g.top, g.left)


def test_bad_sizes_are_named():
  with pytest.raises(ValueError, match='0x640'):
    frame_geometry(0, 640)
  with pytest.raises(ValueError, match='multiple of teacher_size'):
    frame_geometry(10, 10, size=300)


def test_padding_colour_mask_and_normalisation():
  g = frame_geometry(360, 640)
  clip = moving_square(2, g.height, g.width)
  pixels, mask = pad_and_normalise(clip, g)
  assert pixels.shape == (2, 448, 448, 3) and mask.shape == (2, 448, 448)
  assert mask[:, 84:336].all() and not mask[:, :84].any() and not mask[:, 336:].any()
  np.testing.assert_allclose(pixels[0, 0, 0], (PAD_RGB / 255.0 - CLIP_MEAN) / CLIP_STD,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(pixels[0, 84:336], (clip[0] / 255.0 - CLIP_MEAN) / CLIP_STD,
                             rtol=1e-5, atol=1e-6)
  assert tuple(PAD_RGB) == (122, 116, 104)
  with pytest.raises(ValueError, match='frames are 10x10'):
    pad_and_normalise(np.zeros((1, 10, 10, 3), np.uint8), g)


def test_normalise_gives_the_bits_of_the_per_pixel_arithmetic():
  """`normalise` looks values up; they must be exactly what `(x / 255 - mean) / std` in float32
  gives for every 8-bit value of every channel, on a canvas of any layout (a channel-last view
  with strides, as `pad` makes)."""
  v = np.arange(256)
  every = np.stack([v, v[::-1], np.roll(v, 7)], -1).astype(np.uint8).reshape(4, 8, 8, 3)
  want = (every.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  got = normalise(every)
  assert got.dtype == np.float32 and got.shape == every.shape
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  view = np.random.default_rng(0).integers(0, 256, (2, 30, 40, 3)).astype(np.uint8)[:, ::3, ::-5]
  np.testing.assert_array_equal(normalise(view), (view.astype(np.float32) / 255.0 - CLIP_MEAN)
                                / CLIP_STD)
  with pytest.raises(ValueError, match='expected uint8'):
    normalise(every.astype(np.float32))
