"""Hugging Face Llama names -> our scanned decoder parameters, one tensor at a time.

Tensors arrive as (name, array) pairs in any order (a sharded checkpoint streams shard by
shard); each is transposed into place inside preallocated stacked arrays `[L, ...]`, so host
memory holds the converted model plus one shard, never two copies of the model.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

from panda_jax.convert.common import ConversionError
from panda_jax.models.llama import LlamaConfig

# Non-persistent buffers some exports carry; recomputed from rope_theta (checked, not converted).
ROPE_BUFFERS = ('model.rotary_emb.inv_freq', 'model.rotary_emb.original_inv_freq')

_LAYER = re.compile(r'^model\.layers\.(\d+)\.(.+)$')


def config_from_hf(hf: Mapping[str, Any], **overrides) -> LlamaConfig:
  """LlamaConfig from a Hugging Face `config.json` dict (errors name unsupported settings)."""
  heads = hf['num_attention_heads']
  rope = hf.get('rope_parameters') or {}
  theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
  rope_type = rope.get('rope_type', 'default')
  if hf.get('rope_scaling') or rope_type != 'default':
    raise ConversionError(f'rope scaling {hf.get("rope_scaling") or rope_type!r} is not '
                          'supported (Video-Panda uses plain RoPE)')
  if hf.get('attention_bias') or hf.get('mlp_bias'):
    raise ConversionError('attention_bias / mlp_bias are not supported (Llama-2 has none)')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ConversionError(f'hidden_act={hf.get("hidden_act")!r}; only silu is supported')
  cfg = LlamaConfig(
      vocab_size=hf['vocab_size'], hidden=hf['hidden_size'], layers=hf['num_hidden_layers'],
      heads=heads, kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp=hf['intermediate_size'], rms_eps=hf.get('rms_norm_eps', 1e-6), rope_theta=theta,
      max_positions=hf.get('max_position_embeddings', 4096), **overrides)
  cfg.validate()
  return cfg


def _shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  e, h, k, d, m, n = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp, cfg.layers
  return {
      'embed_tokens/embedding': (cfg.vocab_size, e),
      'layers/attn/q/kernel': (n, e, h, d),
      'layers/attn/k/kernel': (n, e, k, d),
      'layers/attn/v/kernel': (n, e, k, d),
      'layers/attn/o/kernel': (n, h, d, e),
      'layers/mlp/gate/kernel': (n, e, m),
      'layers/mlp/up/kernel': (n, e, m),
      'layers/mlp/down/kernel': (n, m, e),
      'layers/attn_norm/scale': (n, e),
      'layers/mlp_norm/scale': (n, e),
      'final_norm/scale': (e,),
      'lm_head/kernel': (e, cfg.vocab_size),
  }


_PER_LAYER = {
    'self_attn.q_proj.weight': ('layers/attn/q/kernel', 'qkv'),
    'self_attn.k_proj.weight': ('layers/attn/k/kernel', 'qkv'),
    'self_attn.v_proj.weight': ('layers/attn/v/kernel', 'qkv'),
    'self_attn.o_proj.weight': ('layers/attn/o/kernel', 'o'),
    'mlp.gate_proj.weight': ('layers/mlp/gate/kernel', 'T'),
    'mlp.up_proj.weight': ('layers/mlp/up/kernel', 'T'),
    'mlp.down_proj.weight': ('layers/mlp/down/kernel', 'T'),
    'input_layernorm.weight': ('layers/attn_norm/scale', None),
    'post_attention_layernorm.weight': ('layers/mlp_norm/scale', None),
}
_GLOBAL = {
    'model.embed_tokens.weight': ('embed_tokens/embedding', None),
    'model.norm.weight': ('final_norm/scale', None),
    'lm_head.weight': ('lm_head/kernel', 'T'),
}


class LlamaBuilder:
  """Collects Hugging Face tensors into our parameter tree.

  `add(name, array)` returns False for a name that is not the decoder's (the caller decides
  whether that is unexpected); `finish()` checks that every tensor of every layer arrived and
  returns the nested params. `kept`, when given, receives the tensors accepted and not
  converted (the RoPE buffers; the head of a checkpoint converted for a model whose head is
  its embedding), as read.
  """

  def __init__(self, cfg: LlamaConfig, dtype=None, tie_embeddings: bool = False,
               kept: dict | None = None):
    self.cfg = cfg
    self.kept = kept
    self.dtype = dtype
    self.tie = tie_embeddings
    self.shapes = _shapes(cfg)
    self.arrays: dict[str, np.ndarray] = {}
    self.seen: dict[str, set[int]] = {}
    self.problems: list[str] = []

  def _target(self, path: str, src_dtype) -> np.ndarray:
    if path not in self.arrays:
      self.arrays[path] = np.empty(self.shapes[path], self.dtype or src_dtype)
    return self.arrays[path]

  def _transform(self, w: np.ndarray, how: str | None, out_shape) -> np.ndarray:
    if how == 'qkv':   # [N*D, E] -> [E, N, D]
      return w.T.reshape(out_shape)
    if how == 'o':     # [E, H*D] -> [H, D, E]
      return w.T.reshape(out_shape)
    if how == 'T':
      return w.T
    return w

  def add(self, name: str, w: np.ndarray) -> bool:
    if name in ROPE_BUFFERS:
      self._check_rope(name, np.asarray(w))
      self._keep(name, w)
      return True
    if name == 'lm_head.weight' and getattr(self.cfg, 'tie_embeddings', False):
      self._keep(name, w)       # the model has no head parameter: finish() would drop it
      return True
    m = _LAYER.match(name)
    if m:
      layer, rest = int(m.group(1)), m.group(2)
      if rest not in _PER_LAYER:
        return False
      path, how = _PER_LAYER[rest]
      if layer >= self.cfg.layers:
        self.problems.append(f'{name}: layer {layer} but the config has {self.cfg.layers}')
        return True
      out_shape = self.shapes[path][1:]
      idx: Any = layer
    elif name in _GLOBAL:
      path, how = _GLOBAL[name]
      out_shape = self.shapes[path]
      idx = ...
    else:
      return False
    try:
      value = self._transform(np.asarray(w), how, out_shape)
      if value.shape != tuple(out_shape):
        raise ValueError(f'becomes {value.shape}')
    except ValueError as e:
      self.problems.append(f'{name}: shape {tuple(np.shape(w))} does not fit {path} '
                           f'{tuple(out_shape)} ({e})')
      return True
    self._target(path, value.dtype)[idx] = value
    self.seen.setdefault(path, set()).add(-1 if idx is ... else layer)
    return True

  def _keep(self, name: str, w) -> None:
    if self.kept is not None:
      self.kept[name] = np.asarray(w)

  def _check_rope(self, name: str, inv_freq: np.ndarray) -> None:
    d = self.cfg.head_dim
    want = 1.0 / (self.cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if inv_freq.shape != want.shape or not np.allclose(inv_freq, want, rtol=1e-4):
      self.problems.append(f'{name} does not match rope_theta={self.cfg.rope_theta} and '
                           f'head_dim={d}')

  def finish(self) -> dict:
    missing = []
    if getattr(self.cfg, 'tie_embeddings', False):
      # A model with tied embeddings has no head parameter (a tied checkpoint's copy, if it
      # carries one, is dropped).
      self.shapes.pop('lm_head/kernel', None)
      self.arrays.pop('lm_head/kernel', None)
    for path, shape in self.shapes.items():
      if path == 'lm_head/kernel' and self.tie and path not in self.arrays:
        if 'embed_tokens/embedding' in self.arrays:
          self.arrays[path] = np.ascontiguousarray(self.arrays['embed_tokens/embedding'].T)
          continue
      seen = self.seen.get(path, set())
      if path.startswith('layers/'):
        gone = sorted(set(range(self.cfg.layers)) - seen)
        if gone:
          missing.append(f'{path} for layers {gone}')
      elif not seen:
        missing.append(path)
    if missing or self.problems:
      lines = ['cannot convert the Llama checkpoint:']
      if missing:
        lines.append(f'  missing ({len(missing)}): ' + '; '.join(missing))
      lines += ['  ' + p for p in self.problems]
      raise ConversionError('\n'.join(lines))
    return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in self.arrays.items()})


class _Stacked:
  """Per-layer arrays seen as one `[L, ...]` stack, without copying them into one."""

  def __init__(self, arrays):
    self.arrays = arrays
    self.shape = (len(arrays),) + tuple(np.shape(arrays[0]))

  def __getitem__(self, i):
    return self.arrays[i]


class _Transposed:
  """The embedding seen as the tied head's kernel [E, V] (only its shape is ever read)."""

  def __init__(self, emb):
    self.shape = tuple(np.shape(emb))[::-1]


def _untransform(k: np.ndarray, how: str | None) -> np.ndarray:
  """The inverse of `LlamaBuilder._transform`: our (one layer's) array -> Hugging Face's."""
  if how == 'qkv':   # [E, N, D] -> [N*D, E]
    return k.reshape(k.shape[0], -1).T
  if how == 'o':     # [H, D, E] -> [E, H*D]
    return k.reshape(-1, k.shape[-1]).T
  if how == 'T':
    return k.T
  return k


def iter_llama_tensors(params: Mapping, cfg: LlamaConfig, *, dtype=None,
                       tie_embeddings: bool | None = None):
  """The inverse of `convert_llama`: yields (Hugging Face name, array) for our decoder params,
  one tensor at a time (the scanned `[L, ...]` stacks unstacked, kernels transposed back).

  `dtype` casts every tensor (default: as stored). `tie_embeddings` leaves `lm_head.weight` out
  (a tied checkpoint has none); None decides by content: tied when the head is exactly the
  embedding's transpose (as `convert_llama(tie_embeddings=True)` makes it).
  """
  if getattr(cfg, 'qk_norm', False):
    raise ConversionError('the decoder normalises queries and keys per head (model.llm.qk_norm), '
                          'which a Hugging Face Llama has no weights for: it cannot be exported '
                          'as a Llama or in the Video-Panda layout')
  flat = traverse_util.flatten_dict(params, sep='/')
  if getattr(cfg, 'tie_embeddings', False):   # the model has no head: it is the embedding
    if tie_embeddings is False:
      raise ConversionError('the decoder ties its head to the embedding (model.llm.'
                            'tie_embeddings): it exports only with tied embeddings')
    tie_embeddings = True
    flat.setdefault('lm_head/kernel', _Transposed(flat['embed_tokens/embedding']))
  if 'layers_0' in params and 'layers' not in params:   # unscanned: one subtree per layer
    for path in [k for k in _shapes(cfg) if k.startswith('layers/')]:
      per = [flat.get(path.replace('layers/', f'layers_{i}/', 1)) for i in range(cfg.layers)]
      if all(a is not None for a in per):
        flat[path] = _Stacked(per)
  shapes = _shapes(cfg)
  problems = [f'{k}: {tuple(np.shape(flat[k]))}, the config says {v}' for k, v in shapes.items()
              if k in flat and tuple(np.shape(flat[k])) != v]
  missing = sorted(set(shapes) - set(flat))
  if missing or problems:
    raise ConversionError('cannot export the Llama params:\n  ' + '\n  '.join(
        ([f'missing: {", ".join(missing)}'] if missing else []) + problems))
  if tie_embeddings is None:
    tie_embeddings = is_tied(params, cfg)
  cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype, copy=False))
  for name, (path, how) in _GLOBAL.items():
    if name == 'lm_head.weight' and tie_embeddings:
      continue
    yield name, cast(_untransform(np.asarray(flat[path]), how))
  for layer in range(cfg.layers):
    for rest, (path, how) in _PER_LAYER.items():
      yield f'model.layers.{layer}.{rest}', cast(_untransform(np.asarray(flat[path][layer]), how))


def is_tied(params: Mapping, cfg: LlamaConfig | None = None) -> bool:
  """Whether the head is the embedding: a config with tied embeddings (no head parameter), or
  a head that is exactly the embedding's transpose."""
  if getattr(cfg, 'tie_embeddings', False) or 'lm_head' not in params:
    return True
  emb, head = params['embed_tokens']['embedding'], params['lm_head']['kernel']
  return emb.shape == head.shape[::-1] and np.array_equal(np.asarray(emb), np.asarray(head).T)


def hf_config(cfg: LlamaConfig, *, tie_embeddings: bool = False, dtype=None) -> dict:
  """The Hugging Face `config.json` dict of `cfg` (what `config_from_hf` reads back)."""
  out = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden,
      'intermediate_size': cfg.mlp, 'num_hidden_layers': cfg.layers,
      'num_attention_heads': cfg.heads, 'num_key_value_heads': cfg.kv_heads,
      'head_dim': cfg.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': cfg.rms_eps,
      'rope_theta': cfg.rope_theta, 'rope_scaling': None,
      'max_position_embeddings': cfg.max_positions, 'attention_bias': False,
      'mlp_bias': False, 'tie_word_embeddings': bool(tie_embeddings),
      'initializer_range': 0.02, 'pretraining_tp': 1, 'use_cache': True,
  }
  if dtype is not None:
    out['torch_dtype'] = np.dtype(dtype).name
  return out


def convert_llama(tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                  cfg: LlamaConfig, *, dtype=None, tie_embeddings: bool = False,
                  ignore_other: bool = False, kept: dict | None = None) -> dict:
  """Converts decoder tensors; names not the decoder's are errors unless `ignore_other`.
  `kept`, when given, receives the tensors accepted and not converted (`LlamaBuilder`)."""
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  builder = LlamaBuilder(cfg, dtype=dtype, tie_embeddings=tie_embeddings, kept=kept)
  unexpected = []
  for name, w in items:
    if not builder.add(name, w) and not ignore_other:
      unexpected.append(name)
  if unexpected:
    builder.problems.append(f'unexpected ({len(unexpected)}): ' + ', '.join(sorted(unexpected)))
  return builder.finish()
