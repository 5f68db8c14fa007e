"""`panda_jax.convert.export`: our variables back in the released Hugging Face layout.

The golden cases' `param/*` tensors are the authors' PyTorch state dicts (their Llama ones,
Hugging Face `LlamaForCausalLM`'s): converted in and exported out, every one comes back with
its name, shape, dtype and bytes, none excepted: those our model has no place for are kept by
the converter (`unused.safetensors` in a converted directory) and written back by the exporter.
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
from panda_jax.convert.llama import convert_llama
from panda_jax.convert.panda import convert_panda
from panda_jax.convert.visual import convert_visual, unused_tensors, visual_to_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = golden.case_paths()


def _same(want: dict, got: dict) -> None:
  """Names, shapes, dtypes and bytes equal."""
  assert sorted(got) == sorted(want)
  for name, a in want.items():
    b = got[name]
    assert (b.shape, b.dtype) == (a.shape, a.dtype), name
    assert _bits_equal(a, b), name


def _bits_equal(a, b) -> bool:
  """Bit for bit (NaN payloads and -0.0 included), without copying strided views."""
  a, b = np.asarray(a), np.asarray(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    return False
  if a.dtype.kind in 'fc' or a.dtype.name == 'bfloat16':
    a, b = a.view(f'u{a.dtype.itemsize}'), b.view(f'u{b.dtype.itemsize}')
  return bool(np.array_equal(a, b))


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
  """Converted in, exported out: the same tensors, every one (names, shapes, dtypes, bytes).
  Those the model has no place for (the unused `lmhra2` module, `num_batches_tracked`, the RoPE
  buffers, the teacher's post-LayerNorm) are kept by the converter and written back; the whole
  Video-Panda goes through the files both ways (`unused.safetensors` included), and without
  that file the export writes today's stand-ins."""
  meta, params, _, _, _ = golden.load_case(path)
  kind = meta['kind']
  if kind == 'llama_gguf':
    return _gguf_round_trip(meta)
  kept = {}
  if kind == 'stab':
    cfg = golden.stab_config_from_meta(meta)
    got = visual_to_torch(convert_visual(params, cfg, kept=kept)['visual'], None, cfg,
                          kept=kept)
  elif kind == 'distill':
    from panda_jax.models.distill import DistillConfig
    cfg = DistillConfig(llm_hidden=meta['llm_hidden'], teacher_hidden=meta['teacher_hidden'],
                        heads=meta['heads'], layers=tuple(meta['layer_idx']))
    got = visual_to_torch(None, convert_visual(params, None, cfg, kept=kept)['distill']['params'],
                          None, cfg, kept=kept)
  elif kind == 'languagebind_video':
    from panda_jax.convert.teacher import convert_teacher, teacher_to_torch
    cfg = _teacher_config(meta)
    prefix = meta.get('param_prefix', 'vision_model.')
    got = teacher_to_torch(convert_teacher(params, cfg, prefix, kept=kept)['params'], cfg,
                           prefix, kept=kept)
  elif kind == 'llama':
    # Through the files: what transformers' from_pretrained reads.
    cfg = golden.llama_config_from_meta(meta)
    variables = {'params': convert_llama(params, cfg, kept=kept)}
    export.export('llama', cfg, variables, tmp_path, source_model='llama', kept=kept)
    got = hf_io.load_tensors(tmp_path)
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
    import jax
    cfg = golden.panda_config_from_meta(meta)
    variables = convert_panda(params, cfg, kept=kept)
    assert kept and all(jax.tree.leaves(jax.tree.map(      # keeping changes nothing converted
        _bits_equal, variables, convert_panda(params, cfg))))
    summary = export.export('panda', cfg, variables, tmp_path / 'out', max_shard_bytes=200_000,
                            kept=kept)
    assert summary['shards'] > 3
    got = hf_io.load_tensors(tmp_path / 'out')
    # The export converts back to the same model (config included), the same variables and
    # the same kept tensors (unused.safetensors), which an export of it writes back.
    back = conv.convert_directory(tmp_path / 'out', tmp_path / 'back', llm_dtype='float32')
    assert back == cfg
    _, _, again = conv.load_converted(tmp_path / 'back')
    same = jax.tree.map(_bits_equal, variables, jax.tree.map(np.asarray, again))
    assert all(jax.tree.leaves(same))
    _same(kept, conv.read_unused(tmp_path / 'back'))
    (tmp_path / 'tok').mkdir()
    (tmp_path / 'tok' / 'tokenizer.model').write_bytes(b'stand-in')
    export.run(str(tmp_path / 'back'), str(tmp_path / 'again'), tokenizer=str(tmp_path / 'tok'))
    _same(params, hf_io.load_tensors(tmp_path / 'again'))
    # Without kept tensors (a model trained from scratch): PyTorch's initial values instead.
    plain = dict(export.panda_tensors(cfg, variables))
    assert sorted(plain) == sorted(params)
    _same(unused_tensors(cfg.stab), {n: plain[n] for n in kept})
  else:
    raise AssertionError(f'golden kind {kind!r} has no round trip here: add one')
  _same(params, got)


def test_export_to_a_bucket(gcs_bucket, tmp_path):
  """DST in Cloud Storage (an emulator): the same files as a local export; a non-empty DST is
  refused there too; the converter reads the export back from the bucket. The converter's side
  file of kept tensors goes to a bucket and back with its dtypes and bytes."""
  import ml_dtypes
  from panda_jax import storage
  meta, params, _, _, _ = golden.load_case(golden.case_path('video_panda_tiny'))
  cfg = golden.panda_config_from_meta(meta)
  variables = convert_panda(params, cfg)
  dst = f'{gcs_bucket}/export'
  export.export('panda', cfg, variables, dst, max_shard_bytes=1_000_000)
  export.export('panda', cfg, variables, tmp_path / 'local', max_shard_bytes=1_000_000)
  assert storage.listdir(dst) == sorted(os.listdir(tmp_path / 'local'))
  _same(hf_io.load_tensors(tmp_path / 'local'), hf_io.load_tensors(storage.local_copy(dst)))
  with pytest.raises(FileExistsError, match=f'--dst={dst} is not empty'):
    export.export('panda', cfg, variables, dst)
  assert conv.convert_directory(dst, tmp_path / 'back', llm_dtype='float32') == cfg
  odd = {'bf16': np.float32([[1.5, -0.0, np.nan]]).astype(ml_dtypes.bfloat16),
         'steps': np.array(7, np.int64), 'f16': np.float16([65504, -1e-7])}
  conv.write_unused(f'{gcs_bucket}/converted', odd)
  assert storage.listdir(f'{gcs_bucket}/converted') == [conv.UNUSED_FILE]
  _same(odd, conv.read_unused(f'{gcs_bucket}/converted'))
  assert conv.read_unused(tmp_path / 'local') == {}


def test_variants_without_a_head_and_with_tied_embeddings(tmp_path):
  """No distillation head (distill.loss='none'): no compressor tensors, requires_video_distill
  false, and it converts back. A tied decoder (llm.tie_embeddings, no head parameter): no
  lm_head.weight, tie_word_embeddings true, converts back without a head. Unscanned layers
  export as scanned ones do. Per-head q/k norms have no Hugging Face counterpart: refused by
  name."""
  import dataclasses
  import jax
  from panda_jax.convert.llama import iter_llama_tensors
  meta, params, _, _, _ = golden.load_case(golden.case_path('video_panda_tiny'))
  cfg = golden.panda_config_from_meta(meta)
  variables = convert_panda(params, cfg)
  cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, loss='none'))
  del variables['params']['distill']
  export.export('panda', cfg, variables, tmp_path / 'nohead')
  names = hf_io.load_tensors(tmp_path / 'nohead')
  assert not any(n.startswith('model.video_tower_compressor.') for n in names)
  hf = json.loads((tmp_path / 'nohead' / 'config.json').read_text())
  assert hf['requires_video_distill'] is False and hf['model_type'] == 'videopanda'
  assert conv.convert_directory(tmp_path / 'nohead', tmp_path / 'nohead_back',
                                llm_dtype='float32') == cfg
  _, _, back = conv.load_converted(tmp_path / 'nohead_back')
  assert all(jax.tree.leaves(jax.tree.map(_bits_equal, variables,
                                          jax.tree.map(np.asarray, back))))

  meta, params, _, _, _ = golden.load_case(golden.case_path('llama_tiny'))
  llm = dataclasses.replace(golden.llama_config_from_meta(meta), tie_embeddings=True)
  tied = convert_llama(params, llm)
  assert 'lm_head' not in tied
  export.export('llama', llm, {'params': tied}, tmp_path / 'tied', source_model='llama')
  assert 'lm_head.weight' not in hf_io.load_tensors(tmp_path / 'tied')
  assert json.loads((tmp_path / 'tied' / 'config.json').read_text())['tie_word_embeddings']
  conv.convert_directory(tmp_path / 'tied', tmp_path / 'tied_back', model='llama',
                         llm_dtype='float32')
  _, back_cfg, back = conv.load_converted(tmp_path / 'tied_back')
  assert back_cfg == llm and 'lm_head' not in back['params']
  # Unscanned layers (`layers_N` subtrees, llm.scan_layers=False) give the same tensors.
  from panda_jax.models.llama import unstack_layers
  scanned = dict(iter_llama_tensors(tied, llm))
  _same(scanned, dict(iter_llama_tensors(jax.tree.map(np.asarray, unstack_layers(tied, llm.layers)),
                                         dataclasses.replace(llm, scan_layers=False))))
  with pytest.raises(Exception, match=r'model\.llm\.qk_norm.*cannot be exported'):
    next(iter_llama_tensors(tied, dataclasses.replace(llm, qk_norm=True)))


# ------------------------------------------------------------------ the fine-tuning example

def _example_blocks(root):
  """docs/finetune.md's small example with /tmp/finetune replaced by `root`: (its python
  block, its bash commands)."""
  from test_docs import shell_commands
  text = open(os.path.join(ROOT, 'docs', 'finetune.md')).read()
  section = text[text.index('## The small example, end to end'):].replace('/tmp/finetune',
                                                                         str(root))
  py = section.split('```python\n', 1)[1].split('```', 1)[0]
  return py, [c for _, c in shell_commands(section)]


def _workdir_config(config):
  import ml_collections
  from panda_jax import config as config_lib
  return config_lib.panda_config(ml_collections.ConfigDict(config['model']))


def _logits(cfg, variables, tok_dir):
  """The model's logits [1, L, V] for a generated clip and a question (valid positions)."""
  import jax
  import jax.numpy as jnp
  from panda_jax.data import text
  from panda_jax.data.assembly import layout_batch
  from panda_jax.models.panda import VideoPanda
  tok = text.load_tokenizer(tok_dir)
  frames, s = 4, cfg.stab.image_size
  ids = text.generation_prompt_ids(tok, 'In which direction does the square move?',
                                   num_frames=frames)[None]
  mask = np.ones((1, frames, s, s), np.float32)
  lay = layout_batch(ids, None, np.ones_like(ids), mask, cfg.stab,
                     max_len=ids.shape[1] + frames * cfg.stab.max_frame_tokens)
  pixels = jax.random.uniform(jax.random.PRNGKey(3), (1, frames, s, s, 3), minval=-1, maxval=1)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()}, pixels=pixels,
               mask=jnp.asarray(mask))
  out = jax.jit(lambda v, b: VideoPanda(cfg).apply(v, b, with_distill=False))(variables, batch)
  return np.asarray(out['logits'], np.float32)[lay['valid']]


@pytest.mark.slow
def test_the_finetuning_example_runs_and_its_export_converts_back(tmp_path):
  """docs/finetune.md's small example, command by command: data.check, a tiny LoRA stage 3,
  eval.videoqa, export, conversion back. The export converted back gives the trained run's
  logits (its LoRA merged); `--model=llama` gives its merged decoder; errors name the path."""
  import jax
  from panda_jax import workdir as workdir_lib
  from panda_jax.models import lora
  py, commands = _example_blocks(tmp_path)
  exec(compile(py, 'docs/finetune.md', 'exec'), {})   # the stand-in videos and tokenizer
  data, run = tmp_path / 'data', tmp_path / 'run'
  outs = []
  for command in commands:
    r = subprocess.run([sys.executable, *command.split()[1:]], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f'{command}\n{r.stderr[-3000:]}'
    outs.append(r.stdout)
  assert [c.split()[2] for c in commands] == [
      'panda_jax.data.check', 'panda_jax.main', 'panda_jax.eval.videoqa',
      'panda_jax.convert.export', 'panda_jax.convert.checkpoint']
  assert 'usable 4' in outs[0] and 'too_long 0' in outs[0]
  assert json.loads((run / 'summary.json').read_text())['step'] == 2
  questions = json.loads((data / 'eval_qa.json').read_text())
  assert len((run / 'eval.jsonl').read_text().splitlines()) == len(questions)
  assert {'config.json', 'model.safetensors.index.json', 'tokenizer.json'} <= set(
      os.listdir(run / 'export'))

  # The trained run (LoRA factors, a bfloat16 base) and its export converted back.
  cfg = _workdir_config(json.loads((run / 'config.json').read_text()))
  _, params, stats = workdir_lib.restore_variables(run)
  assert cfg.llm.lora.enabled and lora.has_factors(params)
  model, back_cfg, back = conv.load_converted(run / 'converted')
  assert model == 'video_panda' and back_cfg == export.lora_off(cfg)
  merged = export.merge_lora(params, cfg.llm.lora)
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b),
                      {'params': merged, 'batch_stats': stats}, jax.tree.map(np.asarray, back))
  assert all(jax.tree.leaves(same))
  ours = _logits(cfg, {'params': params, 'batch_stats': stats}, data / 'tokenizer')
  theirs = _logits(back_cfg, back, data / 'tokenizer')
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())

  # --model=llama: the merged decoder alone.
  export.run(str(run), str(tmp_path / 'llama'), model='llama', llm_dtype='float32',
             workdir_config=_workdir_config)
  conv.convert_directory(tmp_path / 'llama', tmp_path / 'llama_back', model='llama',
                         llm_dtype='float32')
  _, _, llama_back = conv.load_converted(tmp_path / 'llama_back')
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b), merged['llm'],
                      jax.tree.map(np.asarray, llama_back['params']))
  assert all(jax.tree.leaves(same))
  assert not lora.has_factors(llama_back['params'])

  # Errors name the path and what is accepted.
  with pytest.raises(FileNotFoundError, match=f'{tmp_path / "nope"} does not exist; expected a '
                     'training workdir'):
    export.run(str(tmp_path / 'nope'), str(tmp_path / 'x'))
  with pytest.raises(FileNotFoundError, match=f'{data} is neither a training workdir'):
    export.run(str(data), str(tmp_path / 'x'))
  with pytest.raises(ValueError, match='holds a converted .llama. model.*--model=llama'):
    export.run(str(tmp_path / 'llama_back'), str(tmp_path / 'x'), tokenizer=str(data / 'tokenizer'))
  with pytest.raises(FileExistsError, match=f'--dst={run / "export"} is not empty.*--overwrite'):
    export.run(str(run), str(run / 'export'), workdir_config=_workdir_config)
  (run / 'export' / 'notes.txt').write_text('mine')
  export.run(str(run), str(run / 'export'), overwrite=True, max_shard_mb=0.5,
             workdir_config=_workdir_config)
  files = os.listdir(run / 'export')
  assert 'notes.txt' in files and 'model-00001-of-00001.safetensors' not in files
  with pytest.raises(ValueError, match="--model='gpt'; expected one of"):
    export.run(str(run), str(tmp_path / 'x'), model='gpt')
  with pytest.raises(Exception, match='holds LoRA factors .* but its config has no LoRA'):
    export.merge_lora(params, None)
