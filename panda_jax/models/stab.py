"""The Spatio-Temporal Alignment Block (STAB) and the mlp2x_gelu projector.

Spec: `shared/docs/video_panda_spec.md` section 3. Shapes below use
B videos, F frames per video (a multiple of `frames_per_chunk`), G = image_size / patch_size
patches per side, S = G / lsd_stride LSD tokens per side, C the STAB width, L the LLM width.

Static shapes: every frame is processed on its full padded grid. The crop of the padding is an
index map computed on device from the mask (no data-dependent shapes): the cropped patches are
gathered into the top-left corner of a G x G grid, LSD runs on all S x S windows, and the
frame's token sequence `[context] + rows` is read out of a fixed `1 + S * (S + 1)` slot table
with `frame_layout`, which also says how many of those slots are real.

The three single-query attentions (GSTRA, LSD, FSRA) never materialise per-token keys and
values: with one query per group, `q . (W_k x + b_k) = (W_k^T q) . x + const` and
`sum_i a_i (W_v x_i + b_v) = W_v (sum_i a_i x_i) + b_v` (the softmax weights sum to one), so
the key/value projections are applied to one vector per head instead of every token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from panda_jax.models.layers import (BatchNorm, Dense, gelu_exact, layer_norm, partitioned,
                                     quick_gelu)

Dtype = Any

# Logical axis names used by the visual part.
EMBED = 'stab_embed'        # STAB width C
HEADS = 'stab_heads'
HEAD_DIM = 'stab_head_dim'
MLP = 'stab_mlp'            # GSTRA MLP width 4C
LSTE_HIDDEN = 'stab_lste'          # LSTE bottleneck int(C / 1.5)
PATCH = 'stab_patch'        # patch pixels (kh * kw * 3, as three dims: only the first named)
EMBED_OUT = 'stab_embed_out'  # output side of a C x C layer
PROJ_HIDDEN = 'proj_hidden'  # projector middle width (= LLM width)
LLM_EMBED = 'embed'          # LLM width, shared with the decoder


@dataclasses.dataclass(frozen=True)
class StabConfig:
  """Sizes of the STAB + projector. Defaults are the released 7B configuration."""
  hidden: int = 1024
  heads: int = 8
  llm_hidden: int = 4096
  image_size: int = 448
  patch_size: int = 14
  frames_per_chunk: int = 4
  lsd_stride: int = 2
  lmhra_reduction: float = 1.5
  mlp_ratio: int = 4
  dropout: float = 0.5
  # Side, in patches, of the region an all-padding frame keeps (spec: top-left 16 x 16;
  # capped at the grid for small images).
  empty_frame_patches: int = 16
  # Single-query attentions without per-token keys/values (exact); False computes them the
  # reference's way (for benchmarks and equivalence tests).
  exact_rewrites: bool = True
  # Training-mode BatchNorm statistics: 'video' (each video's chunks on their own, as the
  # released code runs its tower once per video) or 'batch' (over the whole batch).
  bn_stats: str = 'video'
  # Ablation switches (paper Tables 4, 5 and 8; docs/demo.md, "Ablations"). The defaults are the
  # released model; each False / other value removes or replaces one part:
  # lste=False: no lmhra1 / dpe, GSTRA reads and the crop takes the raw patch embeddings.
  lste: bool = True
  # gstra=False: no temporal query; the context token is proj(FSRA token) (no `balance`).
  gstra: bool = True
  # fsra=False: no frame query; the context token is proj(GSTRA token) (no `balance`).
  fsra: bool = True
  # row_token=False: no <row> token; a frame is [context] + h * w tokens.
  row_token: bool = True
  # Spatial downsampling by lsd_stride: 'lsd' (attention, released), 'avgpool' (the k x k
  # window mean, the LSD query alone) or 'none' (the full patch grid reaches the LLM).
  downsample: str = 'lsd'
  # Where the downsampling runs: 'after' the LSTE / GSTRA / crop (released) or 'before' them
  # (on the whole padded patch grid; LSTE and GSTRA then see the downsampled grid and the crop
  # is taken in whole windows).
  lsd_position: str = 'after'

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def token_stride(self) -> int:
    """Patches per token side: lsd_stride, or 1 when downsample='none'."""
    return 1 if self.downsample == 'none' else self.lsd_stride

  @property
  def lsd_grid(self) -> int:
    """S, tokens per side of a frame's (uncropped) token grid: the LSD grid, or the patch grid
    G when downsample='none'."""
    return self.grid // self.token_stride

  @property
  def target_grid(self) -> int:
    """Side of the distillation target grid (the teacher's patch grid): G / lsd_stride, whatever
    the downsampling (with 'none' each target covers lsd_stride x lsd_stride tokens)."""
    return self.grid // self.lsd_stride

  @property
  def lste_hidden(self) -> int:
    return int(self.hidden / self.lmhra_reduction)

  @property
  def max_frame_tokens(self) -> int:
    """Slots per frame: context + S rows of (S tokens [+ <row>])."""
    return 1 + self.lsd_grid * (self.lsd_grid + int(self.row_token))

  def validate(self) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size={self.image_size} is not a multiple of '
                       f'patch_size={self.patch_size}')
    if self.grid % self.lsd_stride:
      raise ValueError(f'{self.grid} patches per side is not a multiple of '
                       f'lsd_stride={self.lsd_stride}')
    if self.hidden % self.heads:
      raise ValueError(f'hidden={self.hidden} is not divisible by heads={self.heads}')
    if self.bn_stats not in ('video', 'batch'):
      raise ValueError(f"bn_stats={self.bn_stats!r}; expected 'video' or 'batch'")
    if self.downsample not in ('lsd', 'avgpool', 'none'):
      raise ValueError(f"downsample={self.downsample!r}; expected 'lsd', 'avgpool' or 'none'")
    if self.lsd_position not in ('after', 'before'):
      raise ValueError(f"lsd_position={self.lsd_position!r}; expected 'after' or 'before'")
    if self.downsample == 'none' and self.lsd_position != 'after':
      raise ValueError(f"lsd_position={self.lsd_position!r} with downsample='none': there is "
                       "no downsampling to move; use lsd_position='after'")
    if not (self.gstra or self.fsra):
      raise ValueError('gstra=False and fsra=False together leave no context token; keep at '
                       'least one of them')
    if self.empty_frame_patches < 1:
      raise ValueError(f'empty_frame_patches={self.empty_frame_patches} must be positive '
                       '(it is capped at the patch grid)')


def frame_layout(patch_hw, lsd_grid: int, xp=jnp, row_token: bool = True):
  """Index map from a frame's sequence slots to its token table.

  A frame's table is `[context, S*S LSD tokens (row-major, cropped region top-left), <row>]`
  (size `S*S + 2`; `S*S + 1` without the <row> token). Slot p of the sequence
  `[context] + h rows of (w tokens + <row>)` reads table entry `index[..., p]`;
  `valid[..., p]` is False past the frame's length `1 + h * (w + 1)` (`1 + h * w` without
  <row> tokens). `patch[..., p]` is the grid cell (r * S + c) of a patch slot and -1 for the
  context, `<row>` and empty slots.

  Args:
    patch_hw: int array [..., 2] of (h, w), the frame's token grid after the crop.
    lsd_grid: S (`StabConfig.lsd_grid`).
    xp: `jax.numpy` on device, `numpy` on the host (same results).
    row_token: whether each row ends with a <row> token (`StabConfig.row_token`).
  Returns:
    dict of int32 `index`, bool `valid`, int32 `patch`, each [..., 1 + S * (S + 1)]
    ([..., 1 + S * S] without <row> tokens), and int32 `length` [...].
  """
  s = lsd_grid
  extra = int(row_token)
  h = patch_hw[..., 0:1]
  w = patch_hw[..., 1:2]
  p = xp.arange(1 + s * (s + extra), dtype=np.int32)
  q = xp.maximum(p - 1, 0)
  r = q // (w + extra)
  c = q - r * (w + extra)
  is_ctx = p == 0
  is_row = (c == w) & ~is_ctx         # never true without <row> tokens (c < w)
  valid = is_ctx | (r < h)
  is_patch = valid & ~is_ctx & ~is_row
  cell = r * s + c
  row_slot = s * s + 1
  index = xp.where(is_ctx, 0, xp.where(is_row, row_slot, 1 + cell))
  index = xp.where(valid, index, 0).astype(np.int32)
  patch = xp.where(is_patch, cell, -1).astype(np.int32)
  length = (1 + patch_hw[..., 0] * (patch_hw[..., 1] + extra)).astype(np.int32)
  return {'index': index, 'valid': valid, 'patch': patch, 'length': length}


def crop_boxes(patch_valid, empty_patches: int, xp=jnp):
  """Bounding box of each frame's valid patches.

  Args:
    patch_valid: bool [..., G, G], True where the avg-pooled mask is non-zero.
    empty_patches: side of the top-left square kept by a frame with no valid patch.
    xp: `jax.numpy` on device, `numpy` on the host (same results).
  Returns:
    int32 (row0, col0, height, width), each [...].
  """
  g_h, g_w = patch_valid.shape[-2:]

  def span(any_valid, n):
    has = xp.any(any_valid, axis=-1)
    start = xp.argmax(any_valid, axis=-1)
    end = n - xp.argmax(any_valid[..., ::-1], axis=-1)
    return has, start, end - start

  has_r, r0, h = span(xp.any(patch_valid, axis=-1), g_h)
  has_c, c0, w = span(xp.any(patch_valid, axis=-2), g_w)
  has = has_r & has_c
  r0 = xp.where(has, r0, 0)
  c0 = xp.where(has, c0, 0)
  h = xp.where(has, h, min(empty_patches, g_h))
  w = xp.where(has, w, min(empty_patches, g_w))
  return tuple(a.astype(np.int32) for a in (r0, c0, h, w))


def patch_mask(mask, patch_size: int, xp=jnp):
  """Pixel mask [..., H, W] -> average-pooled patch mask [..., H/p, W/p] (float32)."""
  *lead, h, w = mask.shape
  m = mask.astype(np.float32).reshape(tuple(lead) + (h // patch_size, patch_size,
                                                      w // patch_size, patch_size))
  return m.mean(axis=(-3, -1))


def frame_grid(mask, cfg: 'StabConfig', xp=jnp):
  """What the STAB keeps of each frame, from its pixel mask [..., H, W].

  Returns int32 `patch_hw` [..., 2] (token grid after the crop, odd sizes floored, at least one
  window) and `origin` [..., 2] (the crop's top-left corner in token cells: LSD cells, i.e.
  teacher patches, or patches when `cfg.downsample == 'none'`; for aligning distillation
  targets).
  """
  r0, c0, h, w = crop_boxes(patch_mask(mask, cfg.patch_size, xp) > 0, cfg.empty_frame_patches,
                            xp)
  k = cfg.token_stride
  hw = xp.stack([xp.maximum(h // k, 1), xp.maximum(w // k, 1)], axis=-1).astype(np.int32)
  origin = xp.stack([r0 // k, c0 // k], axis=-1).astype(np.int32)
  return hw, origin


def _head_major_init(key, shape, dtype=jnp.float32):
  """lecun_normal for a [H, D, C] kernel whose input dim is C."""
  h, d, c = shape
  return nn.initializers.lecun_normal()(key, (c, h * d), dtype).T.reshape(shape)


def _single_query_scores(qk: jax.Array, xn: jax.Array, scale: float) -> jax.Array:
  """[..., H, C] x [..., N, C] -> [..., H, N] scores in float32."""
  return jnp.einsum('...hc,...nc->...hn', qk, xn,
                    preferred_element_type=jnp.float32) * scale


class SingleQueryAttention(nn.Module):
  """One query per group attending over that group's tokens (LSD and FSRA).

  `out = query + W_o (attend(W_q LN(query), W_kv LN(tokens)))`, q/kv without bias, heads
  split evenly, scores scaled by `hidden ** -0.5` (the full width, as the released model does).
  """
  hidden: int
  heads: int
  rewrite: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, tokens: jax.Array, mask: jax.Array | None = None):
    """query [..., C], tokens [..., N, C], mask bool [..., N] (None: all valid) -> [..., C]."""
    c, h = self.hidden, self.heads
    d = c // h
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = layer_norm(EMBED, name='q_norm', **kw)(query)
    q = Dense((h, d), (EMBED,), (HEADS, HEAD_DIM), use_bias=False, name='q', **kw)(q)
    xn = layer_norm(EMBED, name='kv_norm', **kw)(tokens)
    # Kernels are stored head-major [H, D, C]: the rewrites below contract D and C per head,
    # and this layout makes them plain batched matmuls (measured 1.6-3x faster on CPU).
    init = partitioned(_head_major_init, (HEADS, HEAD_DIM, EMBED))
    wk = self.param('k_kernel', init, (h, d, c), self.param_dtype).astype(self.dtype)
    wv = self.param('v_kernel', init, (h, d, c), self.param_dtype).astype(self.dtype)
    if self.rewrite:
      qk = jnp.einsum('...hd,hdc->...hc', q, wk)
      scores = _single_query_scores(qk, xn, c ** -0.5)
    else:  # per-token keys, as the reference computes them
      keys = jnp.einsum('...nc,hdc->...nhd', xn, wk)
      scores = jnp.einsum('...hd,...nhd->...hn', q, keys,
                          preferred_element_type=jnp.float32) * c ** -0.5
    if mask is not None:
      scores = jnp.where(mask[..., None, :], scores, -jnp.inf)
    attn = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    if self.rewrite:
      ctx = jnp.einsum('...hn,...nc->...hc', attn, xn)
      v = jnp.einsum('...hc,hdc->...hd', ctx, wv)
    else:
      values = jnp.einsum('...nc,hdc->...nhd', xn, wv)
      v = jnp.einsum('...hn,...nhd->...hd', attn, values)
    out = Dense(c, (HEADS, HEAD_DIM), (EMBED,), name='out', **kw)(v)
    return query.astype(self.dtype) + out


def _depthwise3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise 3x3x3 convolution with zero padding 1: x [N, T, H, W, C], kernel [3, 3, 3, C].

  Written as 27 shifted multiply-adds that XLA fuses into one pass; a grouped
  `conv_general_dilated` with 1024 groups runs about 80x slower on CPU.
  """
  n, t, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  out = None
  for a in range(3):
    for b in range(3):
      for d in range(3):
        term = xp[:, a:a + t, b:b + h, d:d + w] * kernel[a, b, d]
        out = term if out is None else out + term
  return out


class LSTE(nn.Module):
  """Local spatio-temporal encoding on chunks [B, N, T, G, G, C] (both steps residual)."""
  cfg: StabConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    c, r = self.cfg.hidden, self.cfg.lste_hidden
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # lmhra1: BN -> 1x1x1 conv -> depthwise temporal conv (k=3, zero pad 1) -> 1x1x1 conv.
    per_video = self.cfg.bn_stats == 'video'
    y = BatchNorm(EMBED, per_group=per_video, name='bn', **kw)(x, use_running_average)
    b, n = x.shape[:2]
    x = x.reshape((b * n,) + x.shape[2:])
    y = y.reshape(x.shape)
    y = Dense(r, (EMBED,), (LSTE_HIDDEN,), name='down', **kw)(y)
    tk = self.param('temporal_kernel', partitioned(nn.initializers.lecun_normal(), (None, LSTE_HIDDEN)),
                    (3, r), self.param_dtype).astype(self.dtype)
    tb = self.param('temporal_bias', partitioned(nn.initializers.zeros, (LSTE_HIDDEN,)), (r,),
                    self.param_dtype).astype(self.dtype)
    yp = jnp.pad(y, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    t = y.shape[1]
    y = yp[:, 0:t] * tk[0] + yp[:, 1:t + 1] * tk[1] + yp[:, 2:t + 2] * tk[2] + tb
    y = Dense(c, (LSTE_HIDDEN,), (EMBED,), zero_init=True, name='up', **kw)(y)
    x = x + y
    # dpe: depthwise 3x3x3 conv with zero padding 1.
    dk = self.param('dpe_kernel', partitioned(nn.initializers.lecun_normal(),
                                              (None, None, None, None, EMBED)),
                    (3, 3, 3, 1, c), self.param_dtype).astype(self.dtype)
    db = self.param('dpe_bias', partitioned(nn.initializers.zeros, (EMBED,)), (c,),
                    self.param_dtype).astype(self.dtype)
    y = _depthwise3d(x, dk[:, :, :, 0, :]) + db
    return x + y


class GSTRA(nn.Module):
  """Global spatio-temporal relationship aggregator: one learnt query per chunk.

  Pre-norm block `x = q + attn(ln_1(q), ln_3(y)); x = x + mlp(ln_2(x))` with standard
  multi-head attention (biases, head-dim scaling). Input y [N, M, C] -> [N, C].
  """
  cfg: StabConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, deterministic: bool) -> jax.Array:
    c, h = self.cfg.hidden, self.cfg.heads
    d = c // h
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    query = self.param('query', partitioned(nn.initializers.zeros, (EMBED,)), (c,),
                       self.param_dtype)
    x = jnp.broadcast_to(query.astype(self.dtype), (y.shape[0], c))
    qn = layer_norm(EMBED, name='ln_1', **kw)(x)
    yn = layer_norm(EMBED, name='ln_3', **kw)(y)
    q = Dense((h, d), (EMBED,), (HEADS, HEAD_DIM), name='q', **kw)(qn)
    init = partitioned(nn.initializers.lecun_normal(), (EMBED, HEADS, HEAD_DIM))
    binit = partitioned(nn.initializers.zeros, (HEADS, HEAD_DIM))
    wk = self.param('k_kernel', init, (c, h, d), self.param_dtype).astype(self.dtype)
    # The key bias adds the same number to every score of a head: softmax ignores it. It is
    # kept as a parameter so converted checkpoints round-trip.
    bk = self.param('k_bias', binit, (h, d), self.param_dtype).astype(self.dtype)
    wv = self.param('v_kernel', init, (c, h, d), self.param_dtype).astype(self.dtype)
    bv = self.param('v_bias', binit, (h, d), self.param_dtype).astype(self.dtype)
    if self.cfg.exact_rewrites:
      qk = jnp.einsum('nhd,chd->nhc', q, wk)
      scores = _single_query_scores(qk, yn, d ** -0.5)
      attn = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
      ctx = jnp.einsum('nhm,nmc->nhc', attn, yn)
      v = jnp.einsum('nhc,chd->nhd', ctx, wv) + bv
    else:  # per-token keys and values, as the reference computes them
      keys = jnp.einsum('nmc,chd->nmhd', yn, wk) + bk
      values = jnp.einsum('nmc,chd->nmhd', yn, wv) + bv
      scores = jnp.einsum('nhd,nmhd->nhm', q, keys,
                          preferred_element_type=jnp.float32) * d ** -0.5
      attn = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
      v = jnp.einsum('nhm,nmhd->nhd', attn, values)
    x = x + Dense(c, (HEADS, HEAD_DIM), (EMBED,), zero_init=True, name='out', **kw)(v)
    m = layer_norm(EMBED, name='ln_2', **kw)(x)
    m = Dense(self.cfg.mlp_ratio * c, (EMBED,), (MLP,), name='fc', **kw)(m)
    m = quick_gelu(m)
    m = nn.Dropout(self.cfg.dropout)(m, deterministic=deterministic)
    m = Dense(c, (MLP,), (EMBED,), zero_init=True, name='proj', **kw)(m)
    return x + m


class STAB(nn.Module):
  """Video frames -> per-frame visual tokens (before the projector).

  `__call__(pixels [B, F, H, W, 3], mask [B, F, H, W])` returns a dict:
    table [B, F, S*S + 2, C]: context, the S*S LSD tokens (crop in the top-left, row-major),
      and the <row> token ([B, F, S*S + 1, C] when `cfg.row_token` is False); read a frame's
      sequence with `frame_layout(patch_hw)`.
    patch_hw int32 [B, F, 2]: the (h, w) LSD grid of each frame.
  S is `cfg.lsd_grid` (the patch grid G when `cfg.downsample == 'none'`).
  """
  cfg: StabConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array, mask: jax.Array, *, train: bool = False,
               deterministic: bool | None = None):
    cfg = self.cfg
    if deterministic is None:
      deterministic = not train
    cfg.validate()          # e.g. an ablation combination that leaves no context token
    b, f, hgt, wid, ch = pixels.shape
    if (hgt, wid) != (cfg.image_size, cfg.image_size) or ch != 3:
      raise ValueError(f'pixels have shape {pixels.shape}; expected [B, F, {cfg.image_size}, '
                       f'{cfg.image_size}, 3] (frames are padded to a square on the host)')
    if mask.shape != pixels.shape[:4]:
      raise ValueError(f'mask has shape {mask.shape}; expected {pixels.shape[:4]}')
    if f % cfg.frames_per_chunk:
      raise ValueError(f'{f} frames per video is not a multiple of frames_per_chunk='
                       f'{cfg.frames_per_chunk}')
    c, p, g, s, k = cfg.hidden, cfg.patch_size, cfg.grid, cfg.lsd_grid, cfg.lsd_stride
    t = cfg.frames_per_chunk
    n = b * f // t
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    # 1. Patch embedding (conv 14x14 stride 14, no bias) as one matmul over patch pixels.
    x = pixels.astype(self.dtype).reshape(b * f, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    emb = Dense(c, (PATCH, None, None), (EMBED,), use_bias=False, name='patch_embed',
                **kw)(x.reshape(b * f, g, g, p, p, 3))                      # [BF, G, G, C]
    pmask = patch_mask(mask.reshape(b * f, hgt, wid), p)

    def downsample(x):
      """[BF, M, M, C] -> [BF, M / k, M / k, C]: LSD (each k x k window's mean queries its
      k * k tokens) or, for 'avgpool', the window mean alone."""
      m = x.shape[1] // k
      win = x.reshape(b * f, m, k, m, k, c).transpose(0, 1, 3, 2, 4, 5)
      win = win.reshape(b * f, m, m, k * k, c)
      avg = jnp.mean(win.astype(jnp.float32), axis=3).astype(self.dtype)
      if cfg.downsample == 'avgpool':
        return avg
      return SingleQueryAttention(c, cfg.heads, cfg.exact_rewrites, name='lsd', **kw)(avg, win)

    # lsd_position='before' (ablation): downsample the whole padded grid first; LSTE, GSTRA and
    # the crop below then work on the S x S grid.
    early = cfg.downsample != 'none' and cfg.lsd_position == 'before'
    x = downsample(emb) if early else emb
    gt = x.shape[1]                                  # G, or S when downsampling came first

    # 2-3. LSTE and GSTRA on chunks of T frames, padding included.
    x_c = x.reshape(n, t, gt, gt, c)
    if cfg.lste:
      lste = LSTE(cfg, name='lste', **kw)(x_c.reshape(b, n // b, t, gt, gt, c),
                                          use_running_average=not train)
      # 4. Dense connection.
      tokens = (lste + x_c).reshape(b * f, gt, gt, c)
    else:  # ablation: GSTRA and the crop take the patch embeddings themselves
      lste, tokens = x_c, x
    if cfg.gstra:
      ctx_g = GSTRA(cfg, name='gstra', **kw)(lste.reshape(n, t * gt * gt, c), deterministic)
      ctx_g = jnp.repeat(ctx_g, t, axis=0)                                  # [BF, C]

    # 5. Crop the padding: gather the bounding box of valid patches to the top-left (in whole
    # windows when downsampling came first: the box's corner floored to its window).
    r0, c0, h, w = crop_boxes(pmask > 0, cfg.empty_frame_patches)
    if early:
      r0, c0 = r0 // k, c0 // k
    rows = jnp.minimum(r0[:, None] + jnp.arange(gt), gt - 1)
    cols = jnp.minimum(c0[:, None] + jnp.arange(gt), gt - 1)
    tokens = jnp.take_along_axis(tokens, rows[:, :, None, None], axis=1)
    tokens = jnp.take_along_axis(tokens, cols[:, None, :, None], axis=2)
    # Odd sizes are floored like the reference's pooling; a region smaller than one window
    # (which the 28-px preprocessing never produces, and the reference cannot process) keeps
    # one window so the frame still has a finite sequence (`frame_grid` is the same rule).
    ks = cfg.token_stride
    hs, ws = jnp.maximum(h // ks, 1), jnp.maximum(w // ks, 1)

    # 6. LSD (or its ablations): [BF, S, S, C].
    lsd = downsample(tokens) if cfg.downsample != 'none' and not early else tokens
    lsd_flat = lsd.reshape(b * f, s * s, c)

    # 7. FSRA: a learnt query over the frame's valid LSD tokens.
    if cfg.fsra:
      cell_valid = (jnp.arange(s)[None, :, None] < hs[:, None, None]) & \
                   (jnp.arange(s)[None, None, :] < ws[:, None, None])
      cls = self.param('fsra_query', partitioned(nn.initializers.normal(0.02), (EMBED,)), (c,),
                       self.param_dtype)
      ctx_f = SingleQueryAttention(c, cfg.heads, cfg.exact_rewrites, name='fsra', **kw)(
          jnp.broadcast_to(cls.astype(self.dtype), (b * f, c)), lsd_flat,
          cell_valid.reshape(b * f, s * s))

    # 8. Fusion: w = sigmoid(balance); proj = LN -> Dropout -> Linear. With one of GSTRA / FSRA
    # ablated, proj takes the other's token alone (no balance).
    if cfg.gstra and cfg.fsra:
      balance = self.param('balance', partitioned(nn.initializers.zeros, (EMBED,)), (c,),
                           self.param_dtype)
      wgt = jax.nn.sigmoid(balance.astype(jnp.float32)).astype(self.dtype)
      fused = (1 - wgt) * ctx_g + wgt * ctx_f
    else:
      fused = ctx_g if cfg.gstra else ctx_f
    fused = layer_norm(EMBED, name='fusion_norm', **kw)(fused)
    fused = nn.Dropout(cfg.dropout)(fused, deterministic=deterministic)
    context = Dense(c, (EMBED,), (EMBED_OUT,), name='fusion_proj', **kw)(fused)

    # 9-10. Table [context, LSD tokens, <row>] (no <row> entry when row_token=False).
    parts = [context[:, None], lsd_flat]
    if cfg.row_token:
      row = self.param('row_token', partitioned(nn.initializers.normal(0.02), (EMBED,)), (c,),
                       self.param_dtype)
      parts.append(jnp.broadcast_to(row.astype(self.dtype), (b * f, 1, c)))
    table = jnp.concatenate(parts, axis=1)
    patch_hw = jnp.stack([hs, ws], axis=-1).astype(jnp.int32)
    return {'table': table.reshape(b, f, table.shape[1], c),
            'patch_hw': patch_hw.reshape(b, f, 2)}


class Projector(nn.Module):
  """mlp2x_gelu: Linear(C, L) -> GELU (erf) -> Linear(L, L)."""
  llm_hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Dense(self.llm_hidden, (EMBED,), (PROJ_HIDDEN,), name='fc1', **kw)(x)
    x = gelu_exact(x)
    return Dense(self.llm_hidden, (PROJ_HIDDEN,), (LLM_EMBED,), name='fc2', **kw)(x)


class VisualTokenizer(nn.Module):
  """STAB + projector: video -> per-frame LLM-width token sequences (static shapes).

  Returns a dict:
    tokens [B, F, 1 + S*(S+1), L]: each frame's sequence `[context] + rows`, zeros past
      its length (1 + S*S slots without <row> tokens, `cfg.max_frame_tokens` in general).
    valid bool [B, F, 1 + S*(S+1)], length int32 [B, F], patch_hw int32 [B, F, 2],
    patch int32 [B, F, 1 + S*(S+1)]: LSD grid cell of patch slots, -1 elsewhere.
    hidden (if `return_hidden`): the same sequences before the projector.
  """
  cfg: StabConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels, mask, *, train: bool = False, deterministic: bool | None = None,
               return_hidden: bool = False):
    cfg = self.cfg
    out = STAB(cfg, name='stab', dtype=self.dtype, param_dtype=self.param_dtype)(
        pixels, mask, train=train, deterministic=deterministic)
    table, patch_hw = out['table'], out['patch_hw']
    b, f, n_tab, c = table.shape
    proj = Projector(cfg.llm_hidden, name='projector', dtype=self.dtype,
                     param_dtype=self.param_dtype)
    lay = frame_layout(patch_hw, cfg.lsd_grid, row_token=cfg.row_token)
    idx = lay['index'][..., None]
    if cfg.exact_rewrites and not cfg.row_token:
      tokens = jnp.take_along_axis(proj(table), idx, axis=2)
    elif cfg.exact_rewrites:
      # The <row> token is the same vector in every slot: project it once.
      body = proj(table[:, :, :-1])
      row = proj(table[0, 0, -1])
      ptable = jnp.concatenate(
          [body, jnp.broadcast_to(row, (b, f, 1, cfg.llm_hidden))], axis=2)
      tokens = jnp.take_along_axis(ptable, idx, axis=2)
    else:  # project every slot of the sequence, as the reference does
      tokens = proj(jnp.take_along_axis(table, idx, axis=2))
    tokens = jnp.where(lay['valid'][..., None], tokens, 0)
    result = {'tokens': tokens, 'valid': lay['valid'], 'length': lay['length'],
              'patch_hw': patch_hw, 'patch': lay['patch']}
    if return_hidden:
      hidden = jnp.take_along_axis(table, idx, axis=2)
      result['hidden'] = jnp.where(lay['valid'][..., None], hidden, 0)
    return result
