"""`panda_jax.convert.export`: our variables back in the released Hugging Face layout.

The golden cases' `param/*` tensors are the authors' PyTorch state dicts (their Llama ones,
Hugging Face `LlamaForCausalLM`'s): converted in and exported out, every one comes back with
its name, shape, dtype and bytes, except the few the converter drops, each named here.
"""

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from panda_jax import golden
from panda_jax.convert import checkpoint as conv
from panda_jax.convert import export, hf_io
from panda_jax.convert.llama import ROPE_BUFFERS, convert_llama
from panda_jax.convert.panda import convert_panda
from panda_jax.convert.visual import TOWER, convert_visual, unused_tensors, visual_to_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = golden.case_paths()


def _same(want: dict, got: dict, values_differ=()) -> None:
  """Names, shapes, dtypes and bytes equal; `values_differ` names may differ in value only."""
  assert sorted(got) == sorted(want)
  for name, a in want.items():
    b = got[name]
    assert (b.shape, b.dtype) == (a.shape, a.dtype), name
    if name not in values_differ:
      assert np.ascontiguousarray(b).tobytes() == np.ascontiguousarray(a).tobytes(), name


def _teacher_config(meta):
  from panda_jax.models.teacher import TeacherConfig
  return TeacherConfig(
      hidden=meta['hidden_size'], layers=meta['num_hidden_layers'],
      heads=meta['num_attention_heads'], mlp=meta['intermediate_size'],
      patch_size=meta['patch_size'], image_size=meta['image_size'],
      num_frames=meta['num_frames'], activation=meta['hidden_act'],
      temporal=bool(meta['add_time_attn']), select_layer=-1, ln_eps=meta['layer_norm_eps'])


def _gguf_round_trip(meta):
  """The GGUF case holds no param/*: its weights are a GGUF file, which llama.cpp's layout
  turns into Hugging Face tensors (`gguf.iter_hf_tensors`); those are what must come back."""
  from panda_jax.convert import gguf as gguf_io
  from panda_jax.convert.llama import config_from_hf, iter_llama_tensors
  spec = meta['weights']
  path = importlib.metadata.distribution(spec['pip'].split('==')[0]).locate_file(
      spec['path_in_package'])
  reader = gguf_io.import_gguf().GGUFReader(str(path))
  big = ('tokenizer.ggml.tokens', 'tokenizer.ggml.merges', 'tokenizer.ggml.token_type',
         'tokenizer.ggml.scores')                 # the vocabulary: slow to read, not needed
  gmeta = {k: f.contents() for k, f in reader.fields.items() if k not in big}
  hf = gguf_io.hf_config(gmeta, [t.name for t in reader.tensors])
  want = dict(gguf_io.iter_hf_tensors(reader, hf))
  cfg = config_from_hf(hf)
  params = convert_llama(want.items(), cfg, tie_embeddings=hf['tie_word_embeddings'])
  assert hf['tie_word_embeddings'] and 'lm_head.weight' not in want
  _same(want, dict(iter_llama_tensors(params, cfg)))     # tied: no lm_head.weight written


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_golden_params_round_trip(path, tmp_path):
  """Converted in, exported out: the same tensors. Not carried by the converter, so not
  compared: the Llama RoPE buffers (recomputed from rope_theta; checked, then dropped; not
  written) and the teacher's post-LayerNorm (our teacher has none); the unused `lmhra2`
  module's values (written as PyTorch's initial state: the authors' forward never calls it)."""
  meta, params, _, _, _ = golden.load_case(path)
  kind = meta['kind']
  if kind == 'llama_gguf':
    return _gguf_round_trip(meta)
  if kind == 'stab':
    cfg = golden.stab_config_from_meta(meta)
    got = visual_to_torch(convert_visual(params, cfg)['visual'], None, cfg)
  elif kind == 'distill':
    from panda_jax.models.distill import DistillConfig
    cfg = DistillConfig(llm_hidden=meta['llm_hidden'], teacher_hidden=meta['teacher_hidden'],
                        heads=meta['heads'], layers=tuple(meta['layer_idx']))
    got = visual_to_torch(None, convert_visual(params, None, cfg)['distill']['params'], None,
                          cfg)
  elif kind == 'languagebind_video':
    from panda_jax.convert.teacher import convert_teacher, teacher_to_torch
    cfg = _teacher_config(meta)
    prefix = meta.get('param_prefix', 'vision_model.')
    got = teacher_to_torch(convert_teacher(params, cfg, prefix)['params'], cfg, prefix)
    params = {k: v for k, v in params.items() if not k.startswith(prefix + 'post_layernorm.')}
  elif kind == 'llama':
    # Through the files: what transformers' from_pretrained reads.
    cfg = golden.llama_config_from_meta(meta)
    variables = {'params': convert_llama(params, cfg)}
    export.export('llama', cfg, variables, tmp_path, source_model='llama')
    got = hf_io.load_tensors(tmp_path)
    params = {k: v for k, v in params.items() if k not in ROPE_BUFFERS}
    hf = json.loads((tmp_path / 'config.json').read_text())
    for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                'num_attention_heads', 'num_key_value_heads', 'rms_norm_eps', 'rope_theta',
                'max_position_embeddings', 'tie_word_embeddings'):
      assert hf[key] == meta.get(key, hf[key]), key
    assert hf['architectures'] == ['LlamaForCausalLM'] and hf['torch_dtype'] == 'float32'
    import transformers                      # config.json as transformers reads it
    assert transformers.LlamaConfig.from_pretrained(tmp_path).num_key_value_heads == \
        meta.get('num_key_value_heads', meta['num_attention_heads'])
  elif kind == 'video_panda':
    cfg = golden.panda_config_from_meta(meta)
    variables = convert_panda(params, cfg)
    summary = export.export('panda', cfg, variables, tmp_path / 'out', max_shard_bytes=200_000)
    assert summary['shards'] > 3
    got = hf_io.load_tensors(tmp_path / 'out')
    # The export converts back to the same model (config included) and the same variables.
    back = conv.convert_directory(tmp_path / 'out', tmp_path / 'back', llm_dtype='float32')
    assert back == cfg
    _, _, again = conv.load_converted(tmp_path / 'back')
    import jax
    same = jax.tree.map(lambda a, b: np.asarray(b).tobytes() == np.asarray(a).tobytes(),
                        variables, again)
    assert all(jax.tree.leaves(same))
  else:
    raise AssertionError(f'golden kind {kind!r} has no round trip here: add one')
  stab = {'stab': lambda: cfg, 'video_panda': lambda: cfg.stab}.get(kind)
  unused = set(unused_tensors(stab())) if stab else set()
  assert all(n.startswith(TOWER + 'lmhra2.') or n.endswith('num_batches_tracked')
             for n in unused)
  _same(params, got, values_differ=unused)
