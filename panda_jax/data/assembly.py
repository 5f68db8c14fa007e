"""Host-side layout of the multimodal sequence: where every text and visual token goes.

The reference splices, per sample, frame k's projected tokens `[context] + h rows of
(w patches + <row>)` in place of the k-th `<image>` placeholder (id -200), then right-pads the
batch. The lengths depend on each frame's geometry, which the host knows from the mask
(`frame_grid`), so the whole layout is computed here as fixed-size index arrays and the device
only gathers (`VideoPanda.embed_inputs`).
"""

from __future__ import annotations

import numpy as np

from panda_jax.models.stab import StabConfig, frame_grid, frame_layout

IMAGE_TOKEN = -200
IGNORE = -100


class SequenceTooLong(ValueError):
  """The assembled sequence does not fit `max_len` (the data pipeline drops and counts it)."""


def layout_batch(input_ids: np.ndarray, labels: np.ndarray | None, attention_mask: np.ndarray,
                 mask: np.ndarray, cfg: StabConfig, max_len: int) -> dict[str, np.ndarray]:
  """Lays out a batch of prompts with their videos.

  Args:
    input_ids: int [B, Lt] token ids with one IMAGE_TOKEN (-200) per frame, right padded.
    labels: int [B, Lt] (IGNORE where not learned) or None.
    attention_mask: [B, Lt], 1 on real ids.
    mask: [B, F, H, W] the frames' pixel validity masks (what the STAB will see).
    cfg: the STAB config (geometry).
    max_len: assembled sequence length.
  Returns:
    dict of numpy arrays:
      text_ids int32 [B, L]: token id at text positions, 0 elsewhere.
      visual_index int32 [B, L]: f * slots + j for slot j of frame f's sequence, -1 elsewhere
        (slots = `cfg.max_frame_tokens`).
      valid bool [B, L]; labels int32 [B, L] (IGNORE on visual tokens and padding).
      patch_pos int32 [B, F, P]: sequence position of each patch token of each frame
        (row-major over its h x w token grid), P = S * S (S = `cfg.lsd_grid`);
        patch_valid bool [B, F, P].
      teacher_cell int32 [B, F, P]: index into the teacher's Sd x Sd patch grid
        (Sd = `cfg.target_grid`) of the same patch (the crop's offset applied). With
        `cfg.downsample == 'none'` tokens are patches and each teacher cell is the target of
        the lsd_stride x lsd_stride tokens it covers (nearest-neighbour upsampled targets).
      frame_start int32 [B, F]; frame_len int32 [B, F]; patch_hw int32 [B, F, 2].
  Raises:
    ValueError if a sample's placeholder count differs from its frame count;
    SequenceTooLong if a sample does not fit.
  """
  input_ids = np.asarray(input_ids)
  attention_mask = np.asarray(attention_mask).astype(bool)
  b, lt = input_ids.shape
  f = mask.shape[1]
  s = cfg.lsd_grid
  slots = cfg.max_frame_tokens
  patch_hw, origin = frame_grid(np.asarray(mask), cfg, xp=np)
  lay = frame_layout(patch_hw, s, xp=np, row_token=cfg.row_token)   # [B, F, slots] each
  p_max = s * s
  # Tokens per teacher cell side (1, or lsd_stride without downsampling) and the teacher grid.
  u, sd = cfg.lsd_stride // cfg.token_stride, cfg.target_grid

  text_ids = np.zeros((b, max_len), np.int32)
  visual_index = np.full((b, max_len), -1, np.int32)
  valid = np.zeros((b, max_len), bool)
  out_labels = np.full((b, max_len), IGNORE, np.int32)
  patch_pos = np.zeros((b, f, p_max), np.int32)
  patch_valid = np.zeros((b, f, p_max), bool)
  teacher_cell = np.zeros((b, f, p_max), np.int32)
  frame_start = np.zeros((b, f), np.int32)

  for i in range(b):
    ids = input_ids[i][attention_mask[i]]
    labs = None if labels is None else np.asarray(labels)[i][attention_mask[i]]
    n_img = int(np.sum(ids == IMAGE_TOKEN))
    if n_img != f:
      raise ValueError(f'sample {i} has {n_img} <image> placeholders but its video has {f} '
                       f'frames; expected one placeholder per frame')
    total = len(ids) - f + int(lay['length'][i].sum())
    if total > max_len:
      raise SequenceTooLong(f'sample {i} assembles to {total} tokens, more than '
                            f'max_len={max_len}')
    pos, k = 0, 0
    for j, tok in enumerate(ids):
      if tok == IMAGE_TOKEN:
        n = int(lay['length'][i, k])
        frame_start[i, k] = pos
        visual_index[i, pos:pos + n] = k * slots + np.arange(n)
        valid[i, pos:pos + n] = True
        cells = lay['patch'][i, k, :n]
        at = np.nonzero(cells >= 0)[0]               # slots holding patches, row-major
        h, w = patch_hw[i, k]
        patch_pos[i, k, :len(at)] = pos + at
        patch_valid[i, k, :len(at)] = True
        q = np.arange(len(at))
        teacher_cell[i, k, :len(at)] = ((origin[i, k, 0] + q // w) // u * sd
                                        + (origin[i, k, 1] + q % w) // u)
        pos += n
        k += 1
      else:
        text_ids[i, pos] = tok
        valid[i, pos] = True
        if labs is not None:
          out_labels[i, pos] = labs[j]
        pos += 1
  return {'text_ids': text_ids, 'visual_index': visual_index, 'valid': valid,
          'labels': out_labels, 'patch_pos': patch_pos, 'patch_valid': patch_valid,
          'teacher_cell': teacher_cell, 'frame_start': frame_start,
          'frame_len': lay['length'].astype(np.int32), 'patch_hw': patch_hw}
