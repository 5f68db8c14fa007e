"""GGUF Llama files (llama.cpp's format) -> Hugging Face Llama tensors, config and tokenizer.

A GGUF file holds quantized tensors under llama.cpp's names (`token_embd.weight`,
`blk.N.attn_q.weight`, ...), the model sizes as metadata (`llama.block_count`, ...) and the
tokenizer (vocabulary, merges, special ids, chat template). This module reads it with `gguf`
and turns it into what a released Hugging Face checkpoint would hold, so the one converter
(`panda_jax.convert.llama.convert_llama`) and the one decoder serve both:

* `hf_config(meta, tensor_names)`: a `config.json`-style dict (what `config_from_hf` reads);
* `iter_hf_tensors(reader, hf)`: (Hugging Face name, float32 array) pairs, every tensor
  dequantized (`gguf.quants.dequantize`) and the query/key rows put back from llama.cpp's
  rotary layout (`unpermute_qk`);
* `build_tokenizer(meta)`: the transformers tokenizer the metadata describes (built as
  transformers' own GGUF loader builds it, without torch), chat template included.

Only `general.architecture == 'llama'` is accepted: other architectures name their tensors and
lay out their attention differently.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import numpy as np

from panda_jax.convert.common import ConversionError

ARCHITECTURE = 'llama'

# llama.cpp tensor names -> Hugging Face Llama names (per layer: `blk.N.` -> `model.layers.N.`).
GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
LAYER_NAMES = {
    'attn_norm.weight': 'input_layernorm.weight',
    'attn_q.weight': 'self_attn.q_proj.weight',
    'attn_k.weight': 'self_attn.k_proj.weight',
    'attn_v.weight': 'self_attn.v_proj.weight',
    'attn_output.weight': 'self_attn.o_proj.weight',
    'ffn_norm.weight': 'post_attention_layernorm.weight',
    'ffn_gate.weight': 'mlp.gate_proj.weight',
    'ffn_up.weight': 'mlp.up_proj.weight',
    'ffn_down.weight': 'mlp.down_proj.weight',
}
_BLOCK = re.compile(r'^blk\.(\d+)\.(.+)$')


def import_gguf():
  """The `gguf` package, or an ImportError saying how to install it."""
  try:
    import gguf
  except ImportError as e:
    raise ImportError('reading a .gguf file needs the gguf package: '
                      'pip install gguf==0.19.0 (it is in requirements.txt)') from e
  return gguf


def open_gguf(path):
  """-> (gguf.GGUFReader, metadata dict: key -> Python value) of the local file `path`."""
  gguf = import_gguf()
  reader = gguf.GGUFReader(str(path))
  meta = {k: f.contents() for k, f in reader.fields.items()}
  return reader, meta


def check_architecture(meta: Mapping[str, Any], where: Any = 'the GGUF file') -> None:
  arch = meta.get('general.architecture')
  if arch != ARCHITECTURE:
    raise ConversionError(
        f'{where}: general.architecture is {arch!r}; only {ARCHITECTURE!r} GGUF files can be '
        'converted (the decoder is a Llama)')


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face Llama name of llama.cpp tensor `gguf_name`, or None if it has none."""
  if gguf_name in GLOBAL_NAMES:
    return GLOBAL_NAMES[gguf_name]
  m = _BLOCK.match(gguf_name)
  if m and m.group(2) in LAYER_NAMES:
    return f'model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}'
  return None


def hf_config(meta: Mapping[str, Any], tensor_names) -> dict:
  """A Hugging Face Llama `config.json` dict from a llama GGUF's metadata.

  The head size is `attention.key_length` when given, else hidden / heads; the rotary size
  (`rope.dimension_count`) must equal it (partial rotary is not Llama). A file without
  `output.weight` ties the output projection to the embedding. Rope scaling is passed on as
  `rope_scaling`, which `config_from_hf` refuses by name.
  """
  check_architecture(meta)
  a = ARCHITECTURE

  def need(key):
    if f'{a}.{key}' not in meta:
      raise ConversionError(f'the GGUF metadata has no {a}.{key}')
    return meta[f'{a}.{key}']

  hidden, heads = int(need('embedding_length')), int(need('attention.head_count'))
  kv_heads = int(meta.get(f'{a}.attention.head_count_kv', heads))
  head_dim = int(meta.get(f'{a}.attention.key_length', hidden // heads))
  rotary = int(meta.get(f'{a}.rope.dimension_count', head_dim))
  if rotary != head_dim:
    raise ConversionError(f'{a}.rope.dimension_count={rotary} but the head size is {head_dim}: '
                          'partial rotary embeddings are not supported')
  if 'tokenizer.ggml.tokens' in meta:
    vocab = len(meta['tokenizer.ggml.tokens'])
  else:
    vocab = int(need('vocab_size'))
  vocab = int(meta.get(f'{a}.vocab_size', vocab))
  hf = {
      'model_type': 'llama',
      'architectures': ['LlamaForCausalLM'],
      'vocab_size': vocab,
      'hidden_size': hidden,
      'num_hidden_layers': int(need('block_count')),
      'num_attention_heads': heads,
      'num_key_value_heads': kv_heads,
      'head_dim': head_dim,
      'intermediate_size': int(need('feed_forward_length')),
      'rope_theta': float(meta.get(f'{a}.rope.freq_base', 10000.0)),
      'rms_norm_eps': float(meta.get(f'{a}.attention.layer_norm_rms_epsilon', 1e-5)),
      'max_position_embeddings': int(meta.get(f'{a}.context_length', 4096)),
      'tie_word_embeddings': 'output.weight' not in set(tensor_names),
      'hidden_act': 'silu',
  }
  scaling = meta.get(f'{a}.rope.scaling.type')
  if scaling not in (None, 'none'):
    hf['rope_scaling'] = {'rope_type': scaling,
                          'factor': meta.get(f'{a}.rope.scaling.factor')}
  for key, name in (('bos_token_id', 'bos_token_id'), ('eos_token_id', 'eos_token_id'),
                    ('padding_token_id', 'pad_token_id')):
    if f'tokenizer.ggml.{key}' in meta:
      hf[name] = int(meta[f'tokenizer.ggml.{key}'])
  return hf


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's convert rule (`LlamaModel.permute` in convert_hf_to_gguf.py): the rows of a
  Hugging Face q/k projection `[heads * head_dim, ...]`, whose rotary pairs are (i, i + d/2),
  reordered per head so each pair is adjacent (i.e. reshape(heads, 2, d/2) -> swap -> flat)."""
  return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of `permute_qk`: llama.cpp's q/k rows back in Hugging Face order."""
  if w.shape[0] % (2 * heads):
    raise ConversionError(f'a q/k projection of {w.shape[0]} rows cannot hold {heads} heads '
                          'of an even size')
  return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def check_names(tensor_names, hf: Mapping[str, Any]) -> None:
  """Every tensor has a Hugging Face name and every Llama tensor is there, or one error."""
  names = list(tensor_names)
  unmapped = sorted(n for n in names if hf_name(n) is None)
  want = {'token_embd.weight', 'output_norm.weight'}
  if not hf['tie_word_embeddings']:
    want.add('output.weight')
  want |= {f'blk.{i}.{k}' for i in range(hf['num_hidden_layers']) for k in LAYER_NAMES}
  missing = sorted(want - set(names))
  extra = sorted(n for n in names if hf_name(n) is not None and n not in want)
  lines = []
  if unmapped:
    lines.append(f'tensors with no Llama counterpart ({len(unmapped)}): ' + ', '.join(unmapped))
  if missing:
    lines.append(f'missing tensors ({len(missing)}): ' + ', '.join(missing[:20]))
  if extra:
    lines.append(f'tensors beyond block_count={hf["num_hidden_layers"]}: ' + ', '.join(extra))
  if lines:
    raise ConversionError('cannot convert the GGUF file:\n  ' + '\n  '.join(lines))


def iter_hf_tensors(reader, hf: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, float32 array in Hugging Face layout) for every tensor of `reader`."""
  gguf = import_gguf()
  check_names((t.name for t in reader.tensors), hf)
  for t in reader.tensors:
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    # numpy order is ggml's reversed: [out, in] for a projection, as in PyTorch.
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    kind = _BLOCK.match(t.name)
    if kind and kind.group(2) == 'attn_q.weight':
      w = unpermute_qk(w, hf['num_attention_heads'])
    elif kind and kind.group(2) == 'attn_k.weight':
      w = unpermute_qk(w, hf['num_key_value_heads'])
    yield hf_name(t.name), w


def build_tokenizer(meta: Mapping[str, Any]):
  """The transformers tokenizer (chat template included) that GGUF metadata `meta` describes.

  Built as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds it (transformers'
  `get_gguf_tokenizer` + `convert_gguf_tokenizer`), from metadata read with `gguf` rather than
  transformers' reader, which needs torch.
  """
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf import gguf_tokenizer_mapping as tm

  if 'tokenizer.ggml.tokens' not in meta:
    raise ConversionError('the GGUF metadata has no tokenizer (tokenizer.ggml.tokens)')
  grouped = {group: {name: meta[f'tokenizer.{key}'] for key, name in renames.items()
                     if f'tokenizer.{key}' in meta}
             for group, renames in tm.GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, config = grouped['tokenizer'], grouped['tokenizer_config']
  if tokenizer.get('tokenizer_type') == 'llama':
    config.setdefault('add_bos_token', True)
  for name, key in tm._SPECIAL_TOKENS.items():
    token_id = meta.get(f'tokenizer.ggml.{key}')
    config[name] = tokenizer['tokens'][token_id] if token_id is not None else None
  backend, extra = tm.convert_gguf_tokenizer(meta['general.architecture'], tokenizer)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def read_gguf(path):
  """-> (Hugging Face config dict, tensor iterator, tokenizer) of the local llama GGUF `path`."""
  reader, meta = open_gguf(path)
  check_architecture(meta, path)
  hf = hf_config(meta, [t.name for t in reader.tensors])
  return hf, iter_hf_tensors(reader, hf), build_tokenizer(meta)
