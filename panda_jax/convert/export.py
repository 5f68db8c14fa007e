"""Export a trained or converted model in the released Video-Panda layout (or as a plain Llama).

  python -m panda_jax.convert.export --checkpoint=DIR --dst=DIR [--model=panda|llama]
      [--tokenizer=DIR] [--llm_dtype=keep|bfloat16|float16|float32] [--max_shard_mb=5000]
      [--overwrite]

The inverse of `panda_jax.convert.checkpoint`: `--checkpoint` is what `predict` and
`eval.videoqa` accept (a training workdir, whose newest checkpoint is taken, or a converted
checkpoint). DST gets Hugging Face tensor names (`model.video_tower.*`, `model.video_projector.*`,
`model.video_tower_compressor.*`, `model.layers.*`, ...; `--model=llama`: the decoder alone, as
`LlamaForCausalLM` names it) in safetensors shards with `model.safetensors.index.json`,
`config.json` and the tokenizer's files. Every name and layout transform comes from the
converter's own rules, run backwards (`common.invert_rules`, `llama.iter_llama_tensors`): kernels
transposed back, scanned layers unstacked, packed projections re-packed, BatchNorm statistics
put back. The source tensors the converter kept without converting (a converted checkpoint's
`unused.safetensors`: the unused `lmhra2` module, `num_batches_tracked`, RoPE buffers, a carried
teacher) are written back as they were, so an export of a converted release holds every tensor
of the release; without that file (a model trained from scratch) the `lmhra2` module and
`num_batches_tracked` get PyTorch's initial values and the RoPE buffers (recomputed from
rope_theta) are not written. LoRA factors in the checkpoint are merged into the kernels first
(`panda_jax.models.lora.merge`). DST may be `gs://...` (shards are written locally one at a
time, then uploaded).

`config.json` also carries our own config under `panda_jax` (sizes the weights do not record,
such as the image size and STAB heads), so converting the export back gives the same model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np

from panda_jax import storage
from panda_jax.convert import hf_io
from panda_jax.convert.common import ConversionError
from panda_jax.convert.llama import hf_config as llama_hf_config
from panda_jax.convert.llama import is_tied, iter_llama_tensors
from panda_jax.convert.panda import TEACHER, VISUAL
from panda_jax.convert.visual import visual_to_torch
from panda_jax.models import lora

MODELS = ('panda', 'llama')
DTYPES = {'keep': None, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16,
          'float32': np.float32}
INDEX = hf_io.SAFETENSORS_INDEX
# The tokenizer's files (those a Hugging Face tokenizer directory may hold), copied when present.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json',
                   'special_tokens_map.json', 'added_tokens.json', 'chat_template.jinja',
                   'generation_config.json')
# What an export writes: an existing DST holding anything is refused unless --overwrite, which
# deletes exactly these (a previous export's shards included), never the user's other files.
WRITTEN = ('model-*-of-*.safetensors', 'model.safetensors', INDEX, 'config.json',
           *TOKENIZER_FILES)
# The authors' code reads the STAB's preprocessing sizes from `<mm_video_tower>/
# preprocessor_config.json`, a path relative to their repository's root (where their scripts
# run); the released config points there.
AUTHORS_VIDEO_CONFIG = 'videopanda/config/videopanda-video-LB-patch14-anypixel-448'
AUTHORS_IMAGE_CONFIG = 'videopanda/config/videopanda-vision-LB-patch14-anypixel-448'


# ------------------------------------------------------------------------------- tensors

def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


def merge_lora(params, lora_cfg, dtype=None):
  """`params` with LoRA factors folded into their kernels (`models.lora.merge`: W + scale * A B
  computed in float32 whatever the frozen base's dtype), each merged kernel stored in `dtype`
  (default float32) as soon as it is made, so at most one float32 kernel stack exists at a
  time; `params` as it is when it holds no factors."""
  if not lora.has_factors(params):
    return params
  if lora_cfg is None or not lora_cfg.enabled:
    raise ConversionError('the checkpoint holds LoRA factors (lora_a / lora_b) but its config '
                          'has no LoRA (model.lora.rank 0): cannot merge them')

  def walk(tree):
    if not isinstance(tree, Mapping):
      return tree
    if 'lora_a' not in tree and 'lora_b' not in tree:
      return {k: walk(v) for k, v in tree.items()}
    module = {k: tree[k] for k in ('kernel', 'lora_a', 'lora_b') if k in tree}
    if 'kernel' in module:
      module['kernel'] = np.asarray(module['kernel'], np.float32)
    merged = lora.merge(module, lora_cfg)         # raises, naming them, on incomplete factors
    out = {k: walk(v) for k, v in tree.items() if k not in module}
    out['kernel'] = np.asarray(merged['kernel']).astype(dtype or np.float32)
    return out

  return walk(params)


def lora_config(cfg):
  """The LoRA config of a PandaConfig or LlamaConfig (`cfg.lora` or `cfg.llm.lora`, the one of
  rank > 0), or None."""
  for c in (cfg, getattr(cfg, 'llm', None)):
    found = getattr(c, 'lora', None)
    if found is not None and found.enabled:
      return found
  return None


def lora_off(cfg):
  """`cfg` with LoRA off (rank 0) wherever it has a LoRA config: the merged model's."""
  llm = getattr(cfg, 'llm', None)
  if llm is not None and hasattr(llm, 'lora'):
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(llm, lora=type(llm.lora)()))
  if hasattr(cfg, 'lora'):
    cfg = dataclasses.replace(cfg, lora=type(cfg.lora)())
  return cfg


def with_kept(tensors: Iterable[tuple[str, np.ndarray]], kept: Mapping[str, np.ndarray]
              ) -> Iterator[tuple[str, np.ndarray]]:
  """`tensors`, each one `kept` names replaced by kept's array (the converted source's, in
  place of an initial value), then the kept tensors not among them."""
  seen = set()
  for name, a in tensors:
    seen.add(name)
    yield name, kept.get(name, a)
  yield from ((n, a) for n, a in kept.items() if n not in seen)


def decoder_kept(kept: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The kept tensors of the decoder alone (what `--model=llama` writes back): not those of the
  visual part or the teacher."""
  return {n: a for n, a in kept.items() if not n.startswith(VISUAL + (TEACHER,))}


def panda_tensors(cfg, variables) -> Iterator[tuple[str, np.ndarray]]:
  """(released name, array) of a whole Video-Panda's `variables` ({'params': {'visual', 'llm',
  'distill'}, 'batch_stats': {'visual'}}, LoRA already merged): the visual part, then the
  decoder tensor by tensor (views of `variables` where the layout allows)."""
  params = variables['params']
  distill = cfg.distill if 'distill' in params else None
  if distill is None and cfg.distill.loss != 'none':
    raise ConversionError('the checkpoint has no distillation head (params/distill) though its '
                          f'config has distill.loss={cfg.distill.loss!r}')
  visual = {'params': params['visual'],
            'batch_stats': variables.get('batch_stats', {}).get('visual', {})}
  yield from visual_to_torch(visual, params.get('distill'), cfg.stab, distill).items()
  yield from iter_llama_tensors(params['llm'], cfg.llm)


def panda_hf_config(cfg, tie_embeddings: bool = False, dtype=None) -> dict:
  """The released Video-Panda `config.json` of `cfg` (the authors' `VideoPandaConfig`: a
  LlamaConfig plus the keys their `VideoPandaMetaModel` reads), with our config under
  `panda_jax`."""
  out = llama_hf_config(cfg.llm, tie_embeddings=tie_embeddings, dtype=dtype)
  out.update({
      'architectures': ['VideoPandaLlamaForCausalLM'], 'model_type': 'videopanda',
      'mm_video_tower': AUTHORS_VIDEO_CONFIG, 'mm_vision_tower': AUTHORS_IMAGE_CONFIG,
      'video_hidden_size': cfg.stab.hidden, 'mm_hidden_size': cfg.stab.hidden,
      'mm_projector_type': 'mlp2x_gelu', 'use_mm_proj': True,
      'mm_use_im_patch_token': False, 'mm_use_im_start_end': False,
      'mm_vision_select_layer': -2, 'mm_vision_select_feature': 'patch',
      'image_aspect_ratio': 'square',
      'requires_video_distill': cfg.distill.loss != 'none', 'requires_image_distill': False,
      'video_tower_teacher': 'LanguageBind/LanguageBind_Video_merge',
      'mm_vision_tower_teacher': 'LanguageBind/LanguageBind_Image',
      'tune_mm_mlp_adapter': False,
  })
  return out


def our_config(model: str, cfg) -> dict:
  """Our config as `panda_jax.convert.checkpoint` stores it (LoRA off: the export is merged)."""
  from panda_jax.convert.checkpoint import config_to_json  # pylint: disable=import-outside-toplevel
  d = config_to_json(model, cfg)
  d['config'].pop('lora', None)
  if isinstance(d['config'].get('llm'), dict):
    d['config']['llm'].pop('lora', None)
  return d


# ------------------------------------------------------------------------------- writing

def write_safetensors(dst, tensors: Iterable[tuple[str, np.ndarray]], *,
                      max_shard_bytes: int = 5_000_000_000, dtype=None,
                      keep_dtype: Iterable[str] = (), keep_names: Iterable[str] = ()) -> dict:
  """Writes (name, array) pairs as `model-0000i-of-0000N.safetensors` shards of at most
  `max_shard_bytes` (a larger tensor gets a shard of its own) plus `model.safetensors.index.json`
  into `dst`; returns the index. `dtype` casts floating-point tensors whose names do not start
  with one of `keep_dtype` and are not in `keep_names`. Host memory holds one shard at a time;
  a remote `dst` receives each shard as soon as it is complete."""
  items = list(tensors)           # views: cheap; needed to know the shard count in each name
  names = [n for n, _ in items]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ConversionError(f'tensors named twice: {dupes}')
  keep, keep_set = tuple(keep_dtype), frozenset(keep_names)

  def target(name, a):
    if (dtype is None or not np.issubdtype(a.dtype, np.floating) or name.startswith(keep)
        or name in keep_set):
      return a.dtype
    return np.dtype(dtype)

  sizes = [int(np.prod(a.shape)) * np.dtype(target(n, a)).itemsize for n, a in items]
  shards: list[list[int]] = [[]]
  filled = 0
  for i, size in enumerate(sizes):
    if shards[-1] and filled + size > max_shard_bytes:
      shards.append([])
      filled = 0
    shards[-1].append(i)
    filled += size
  count = len(shards)
  weight_map = {}
  storage.makedirs(dst)
  for s, members in enumerate(shards):
    file = f'model-{s + 1:05d}-of-{count:05d}.safetensors'
    # (save_safetensors makes each contiguous, keeping 0-d tensors 0-d.)
    shard = {items[i][0]: np.asarray(items[i][1], dtype=target(*items[i])) for i in members}
    hf_io.write_safetensors(storage.join(dst, file), shard, metadata={'format': 'pt'})
    del shard
    weight_map.update({items[i][0]: file for i in members})
  index = {'metadata': {'total_size': sum(sizes)}, 'weight_map': weight_map}
  storage.write_json(storage.join(dst, INDEX), index, indent=2)
  return index


def prepare_dst(dst, overwrite: bool) -> None:
  """Refuses a `dst` that holds anything unless `overwrite`; then deletes what an export
  writes (WRITTEN) there, and nothing else."""
  if storage.exists(dst) and not storage.isdir(dst):
    raise FileExistsError(f'--dst={dst} is a file; give a directory (new, or empty)')
  held = storage.listdir(dst) if storage.isdir(dst) else []
  if held and not overwrite:
    shown = ', '.join(held[:10]) + (f', ... ({len(held)} in all)' if len(held) > 10 else '')
    raise FileExistsError(f'--dst={dst} is not empty (holds {shown}); give a new or empty '
                          'directory, or --overwrite to replace a previous export there (only '
                          'the files an export writes are deleted: ' + ', '.join(WRITTEN) + ')')
  storage.remove_matching(dst, WRITTEN)


def copy_tokenizer(src, dst) -> list[str]:
  """Copies the tokenizer files of directory `src` (TOKENIZER_FILES) into `dst`; returns their
  names. Raises FileNotFoundError when `src` holds none."""
  found = [f for f in TOKENIZER_FILES if storage.isfile(storage.join(src, f))]
  if not any(f in found for f in ('tokenizer.json', 'tokenizer.model')):
    raise FileNotFoundError(f'no tokenizer in {src} (no tokenizer.json or tokenizer.model); '
                            'give --tokenizer=DIR, a Hugging Face tokenizer directory')
  for f in found:
    storage.write_bytes(storage.join(dst, f), storage.read_bytes(storage.join(src, f)))
  return found


def export(model: str, cfg, variables, dst, *, source_model: str = 'video_panda',
           tokenizer=None, llm_dtype: str = 'keep', max_shard_bytes: int = 5_000_000_000,
           overwrite: bool = False, token_ids: Mapping[str, int] | None = None,
           kept: Mapping[str, np.ndarray] | None = None) -> dict:
  """Writes `variables` (of `cfg`, a PandaConfig for a `source_model` 'video_panda' or a
  LlamaConfig for 'llama') to `dst` as `model` ('panda': the released Video-Panda layout;
  'llama': the decoder alone). LoRA factors are merged (with `cfg.lora`). `tokenizer` is a
  directory whose tokenizer files are copied; `token_ids` (bos/eos/pad_token_id) go into
  config.json. `kept`: the source tensors the converter kept (`checkpoint.read_unused`),
  written as they are (names, dtypes, bytes; for 'llama', the decoder's only). Returns a
  summary: tensors, bytes, shards, files."""
  if model not in MODELS:
    raise ValueError(f'model={model!r}; expected one of {list(MODELS)}')
  if llm_dtype not in DTYPES:
    raise ValueError(f'llm_dtype={llm_dtype!r}; expected one of {sorted(DTYPES)}')
  if model == 'panda' and source_model != 'video_panda':
    raise ValueError(f'the checkpoint holds a {source_model!r} model: only --model=llama can '
                     'export it')
  variables = _numpy(variables)
  llm_of = lambda p: p['llm'] if source_model == 'video_panda' else p
  # keep: the decoder's stored dtype (its embedding's; merged LoRA kernels come back to it).
  dtype = DTYPES[llm_dtype] or llm_of(variables['params'])['embed_tokens']['embedding'].dtype
  prepare_dst(dst, overwrite)
  params = merge_lora(variables['params'], lora_config(cfg), dtype)
  cfg = lora_off(cfg)
  variables = dict(variables, params=params)
  llm_params = llm_of(params)
  llm_cfg = cfg.llm if source_model == 'video_panda' else cfg
  tied = is_tied(llm_params, llm_cfg)
  stored = dtype
  if model == 'panda':
    tensors = panda_tensors(cfg, variables)
    hf = panda_hf_config(cfg, tie_embeddings=tied, dtype=stored)
    ours = our_config('video_panda', cfg)
  else:
    tensors = iter_llama_tensors(llm_params, llm_cfg, tie_embeddings=tied)
    hf = llama_hf_config(llm_cfg, tie_embeddings=tied, dtype=stored)
    ours = our_config('llama', llm_cfg)
  hf.update(token_ids or {})
  hf['panda_jax'] = ours
  kept = dict(kept or {}) if model == 'panda' else decoder_kept(kept or {})
  # The visual part and the distillation head stay in their dtype (float32 in the release),
  # the kept tensors in theirs.
  index = write_safetensors(dst, with_kept(tensors, kept), max_shard_bytes=max_shard_bytes,
                            dtype=dtype, keep_dtype=('model.video_tower', 'model.video_projector'),
                            keep_names=kept)
  storage.write_json(storage.join(dst, 'config.json'), hf, indent=2)
  files = copy_tokenizer(tokenizer, dst) if tokenizer is not None else []
  return {'tensors': len(index['weight_map']), 'bytes': index['metadata']['total_size'],
          'shards': len(set(index['weight_map'].values())), 'tokenizer_files': files}


# ------------------------------------------------------------------------------- reading

def load_checkpoint(checkpoint, workdir_config=None):
  """-> (model name, config, variables, tokenizer directory or None) of a converted checkpoint
  (`panda_config.json` + `variables/`) or a training workdir (`config.json` + `checkpoints/`:
  its newest step; `workdir_config(config.json as a dict)` gives the PandaConfig, LoRA
  included; the tokenizer is its `data.tokenizer`)."""
  from panda_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from panda_jax.convert import checkpoint as conv  # pylint: disable=import-outside-toplevel
  path = storage.path(checkpoint)
  accepted = ('a training workdir (config.json + checkpoints/) or a converted checkpoint '
              f'({conv.CONFIG_FILE} + variables/)')
  if storage.exists(path / conv.CONFIG_FILE):
    model, cfg, variables = conv.load_converted(path)
    tok = checkpoint if any(storage.isfile(storage.join(checkpoint, f))
                            for f in ('tokenizer.json', 'tokenizer.model')) else None
    return model, cfg, variables, tok
  if storage.exists(path / 'config.json') and storage.exists(path / 'checkpoints'):
    if workdir_config is None:
      raise ValueError(f'{checkpoint} is a training workdir: give workdir_config')
    config = storage.read_json(path / 'config.json')
    cfg = workdir_config(config)
    step, params, batch_stats = workdir_lib.restore_variables(path)
    tok = (config.get('data') or {}).get('tokenizer') or None
    return 'video_panda', cfg, {'params': params, 'batch_stats': batch_stats}, tok
  if not storage.exists(path):
    raise FileNotFoundError(f'--checkpoint={checkpoint} does not exist; expected {accepted}')
  raise FileNotFoundError(f'--checkpoint={checkpoint} is neither {accepted}; it holds: '
                          + (', '.join(storage.listdir(path)[:10]) or 'nothing'))


def token_ids(tokenizer_dir) -> dict[str, int]:
  """bos/eos/pad_token_id of a Hugging Face tokenizer directory: the special tokens its
  `tokenizer_config.json` names, looked up in its `tokenizer.json` (those it has; none for a
  SentencePiece-only directory, whose Llama ids are config.json's defaults)."""
  cfg_path, vocab_path = (storage.join(tokenizer_dir, f) for f in ('tokenizer_config.json',
                                                                    'tokenizer.json'))
  if not (storage.isfile(cfg_path) and storage.isfile(vocab_path)):
    return {}
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok_cfg = storage.read_json(cfg_path)
  tok = tokenizers.Tokenizer.from_str(storage.read_text(vocab_path))
  out = {}
  for k in ('bos', 'eos', 'pad'):
    token = tok_cfg.get(f'{k}_token')
    token = token.get('content') if isinstance(token, dict) else token
    if isinstance(token, str) and tok.token_to_id(token) is not None:
      out[f'{k}_token_id'] = tok.token_to_id(token)
  return out


def run(checkpoint, dst, *, model: str = 'panda', tokenizer=None, llm_dtype: str = 'keep',
        max_shard_mb: float = 5000, overwrite: bool = False, workdir_config=None) -> dict:
  """`export` of the checkpoint `load_checkpoint` reads; the tokenizer is `tokenizer`, else the
  checkpoint's own (a converted directory holding one, a workdir's `data.tokenizer`)."""
  if model not in MODELS:
    raise ValueError(f'--model={model!r}; expected one of {list(MODELS)}')
  if max_shard_mb <= 0:
    raise ValueError(f'--max_shard_mb={max_shard_mb} must be > 0')
  source, cfg, variables, own_tok = load_checkpoint(checkpoint, workdir_config)
  if model == 'panda' and source != 'video_panda':
    raise ValueError(f'{checkpoint} holds a converted {source!r} model, not a whole '
                     'Video-Panda: export it with --model=llama')
  tok = tokenizer or own_tok
  if tok is None:
    raise FileNotFoundError(f'{checkpoint} names no tokenizer and holds none; give '
                            '--tokenizer=DIR (a Hugging Face tokenizer directory)')
  from panda_jax.convert import checkpoint as conv  # pylint: disable=import-outside-toplevel
  return export(model, cfg, variables, dst, source_model=source, tokenizer=tok,
                llm_dtype=llm_dtype, max_shard_bytes=int(max_shard_mb * 1e6),
                overwrite=overwrite, token_ids=token_ids(tok),
                kept=conv.read_unused(checkpoint))


def define_flags() -> None:
  """The command line's flags (defined when run as a program, never at import)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('checkpoint', None, 'A training workdir or a converted checkpoint.')
  flags.DEFINE_string('dst', None, 'Output directory (new or empty; see --overwrite).')
  flags.DEFINE_enum('model', 'panda', list(MODELS), 'panda: the released Video-Panda layout; '
                    'llama: the decoder alone (LlamaForCausalLM).')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer directory whose files are copied (default: '
                      "the checkpoint's own, or a workdir's data.tokenizer).")
  flags.DEFINE_enum('llm_dtype', 'keep', list(DTYPES), 'dtype of the decoder tensors (keep: as '
                    'stored); the visual part keeps its own.')
  flags.DEFINE_float('max_shard_mb', 5000, 'Largest safetensors shard, in MB.')
  flags.DEFINE_bool('overwrite', False, 'Replace a previous export in --dst.')


def main(argv):
  del argv
  import ml_collections  # pylint: disable=import-outside-toplevel
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from panda_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not f.checkpoint or not f.dst:
    raise app.UsageError('--checkpoint and --dst are required')
  t0 = time.perf_counter()
  summary = run(f.checkpoint, f.dst, model=f.model, tokenizer=f.tokenizer,
                llm_dtype=f.llm_dtype, max_shard_mb=f.max_shard_mb, overwrite=f.overwrite,
                workdir_config=lambda c: config_lib.panda_config(
                    ml_collections.ConfigDict(c['model'])))
  print(f'exported {f.checkpoint} as {f.model} to {f.dst} in {time.perf_counter() - t0:.0f}s: '
        f'{summary["tensors"]} tensors, {summary["bytes"] / 1e6:.1f} MB in {summary["shards"]} '
        f'shard(s); tokenizer files: {", ".join(summary["tokenizer_files"])}')


if __name__ == '__main__':
  from absl import app as _app  # pylint: disable=import-outside-toplevel
  define_flags()
  _app.run(main)
