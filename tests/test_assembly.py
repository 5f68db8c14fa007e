"""The assembled sequence, checked against a slow, written-out construction."""

import numpy as np
import pytest

from conftest import TINY, box_mask
from panda_jax.data.assembly import IGNORE, IMAGE_TOKEN, SequenceTooLong, layout_batch
from panda_jax.models.stab import frame_grid


def _slow(ids, labels, hw, origin, s):
  """Per sample: list of (kind, value, label) in order, plus per-frame patch positions."""
  seq, patches, k = [], [], 0
  for tok, lab in zip(ids, labels):
    if tok != IMAGE_TOKEN:
      seq.append(('text', int(tok), int(lab)))
      continue
    h, w = hw[k]
    frame_patches = []
    seq.append(('visual', (k, 0), IGNORE))
    for r in range(h):
      for c in range(w):
        frame_patches.append((len(seq), (origin[k][0] + r) * s + origin[k][1] + c))
        seq.append(('visual', (k, 1 + r * (w + 1) + c), IGNORE))
      seq.append(('visual', (k, 1 + r * (w + 1) + w), IGNORE))
    patches.append(frame_patches)
    k += 1
  return seq, patches


@pytest.mark.parametrize('boxes_a,boxes_b', [
    ([(0, 112, 0, 112)] * 4, [(28, 84, 0, 112)] * 4),        # square and letterbox
    ([(0, 112, 28, 84)] * 4, [(0, 112, 0, 112), None, (28, 84, 0, 112), (0, 112, 14, 98)]),
])
def test_layout_matches_written_out_sequence(boxes_a, boxes_b):
  f = 4
  # Sample 0: one turn; sample 1: two turns (placeholders in the first), right padded.
  s0 = [1, 30, 31] + [IMAGE_TOKEN] * f + [13, 40, 41, 50, 51, 2]
  l0 = [IGNORE] * (len(s0) - 3) + [51, 2, IGNORE][:0] + [51, 2, 2][:0] + [50, 51, 2]
  l0 = [IGNORE] * (len(s0) - 3) + [50, 51, 2]
  s1 = [1, 30, 31] + [IMAGE_TOKEN] * f + [13, 42, 50, 2, 33, 43, 52, 53, 2]
  l1 = [IGNORE] * (3 + f + 2) + [50, 2] + [IGNORE] * 2 + [52, 53, 2]
  t = max(len(s0), len(s1))
  ids = np.zeros((2, t), np.int32)
  labels = np.full((2, t), IGNORE, np.int32)
  am = np.zeros((2, t), np.int32)
  for i, (s, l) in enumerate(((s0, l0), (s1, l1))):
    ids[i, :len(s)], labels[i, :len(s)], am[i, :len(s)] = s, l, 1
  mask = np.concatenate([box_mask(1, f, boxes_a), box_mask(1, f, boxes_b)])
  lay = layout_batch(ids, labels, am, mask, TINY, max_len=120)
  hw, origin = frame_grid(mask, TINY, xp=np)
  s, slots = TINY.lsd_grid, TINY.max_frame_tokens
  for i in range(2):
    n = int(am[i].sum())
    seq, patches = _slow(ids[i, :n], labels[i, :n], hw[i], origin[i], s)
    assert lay['valid'][i].sum() == len(seq) and lay['valid'][i, :len(seq)].all()
    for p, (kind, value, lab) in enumerate(seq):
      assert lay['labels'][i, p] == lab
      if kind == 'text':
        assert lay['text_ids'][i, p] == value and lay['visual_index'][i, p] == -1
      else:
        assert lay['visual_index'][i, p] == value[0] * slots + value[1]
    assert (lay['labels'][i, len(seq):] == IGNORE).all()
    assert (lay['visual_index'][i, len(seq):] == -1).all()
    for k, fp in enumerate(patches):
      m = len(fp)
      assert lay['patch_valid'][i, k].sum() == m
      np.testing.assert_array_equal(lay['patch_pos'][i, k, :m], [q for q, _ in fp])
      np.testing.assert_array_equal(lay['teacher_cell'][i, k, :m], [c for _, c in fp])


def test_placeholder_count_and_length_errors():
  f = 4
  mask = box_mask(1, f, [(0, 112, 0, 112)] * f)
  ids = np.array([[1] + [IMAGE_TOKEN] * 3 + [5]])
  with pytest.raises(ValueError, match='3 <image> placeholders but its video has 4 frames'):
    layout_batch(ids, None, np.ones_like(ids), mask, TINY, max_len=200)
  ids = np.array([[1] + [IMAGE_TOKEN] * 4 + [5]])
  with pytest.raises(SequenceTooLong, match='assembles to 86 tokens'):
    layout_batch(ids, None, np.ones_like(ids), mask, TINY, max_len=80)
