"""Convert a released checkpoint directory into an Orbax checkpoint our code loads.

  python -m panda_jax.convert.checkpoint --src=DIR --dst=DIR [--model=video_panda|llama]
      [--llm_dtype=bfloat16|float32]

DIR holds `config.json` and safetensors (single, or sharded with an index) or PyTorch `.bin`
shards (read with a restricted unpickler, as `torch.load(weights_only=True)` would; anything
else is refused). Tensors stream shard by shard into preallocated arrays, so a 7B checkpoint
converts within the host's memory. The output directory gets the Orbax checkpoint under
`variables/` and our model config as `panda_config.json` (DST may be `gs://...`); `load_converted` reads both back,
optionally straight into sharded device arrays. The source tensors the model has no place for
(the unused `lmhra2` module, BatchNorm's `num_batches_tracked`, RoPE buffers, a carried
teacher, the image-path aliases) are kept as read, names, dtypes and bytes unchanged, in
`unused.safetensors` beside them (`read_unused`), so `panda_jax.convert.export` writes the
release back whole.

  python -m panda_jax.convert.checkpoint --src=FILE.gguf --dst=DIR --model=llama

A llama.cpp GGUF file (`--format=gguf`, or any SRC ending in `.gguf`) holding a Llama:
its tensors are dequantized to float32 and mapped to Hugging Face names with their query/key
rows un-permuted (`panda_jax.convert.gguf`), then converted by the same `convert_llama`; the
tokenizer and chat template in its metadata are saved beside the weights
(`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`), so DIR is also the
tokenizer directory.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from panda_jax import storage
from panda_jax.convert import gguf as gguf_io
from panda_jax.convert import hf_io
from panda_jax.convert.llama import config_from_hf, convert_llama
from panda_jax.convert.panda import convert_panda, panda_config_from_hf
from panda_jax.models.distill import DistillConfig, default_layers
from panda_jax.models.llama import LlamaConfig
from panda_jax.models.panda import PandaConfig
from panda_jax.models.stab import StabConfig

DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32, 'float16': np.float16}
CONFIG_FILE = 'panda_config.json'
UNUSED_FILE = 'unused.safetensors'
CHUNK_BYTES = 32 << 20
TOWER_PATCH = 'model.video_tower.patch_embedding.weight'
COMPRESSOR_INPUT = 'model.video_tower_compressor.input_layer.weight'
COMPRESSOR_NORM = 'model.video_tower_compressor.norm_layer.'


def _progress(directory):
  """Yields the checkpoint's tensors, logging progress per shard."""
  files = hf_io.checkpoint_files(directory)
  t0 = time.perf_counter()
  for i, path in enumerate(files):
    for item in hf_io.iter_tensors(path):
      yield item
    logging.info('shard %d/%d done (%s), %.0fs', i + 1, len(files), path.name,
                 time.perf_counter() - t0)


def config_to_json(model: str, cfg) -> dict:
  return {'model': model, 'config': dataclasses.asdict(cfg)}


def config_from_json(d: dict):
  model, c = d['model'], d['config']
  if model == 'llama':
    return model, LlamaConfig(**c)
  if model == 'video_panda':
    return model, PandaConfig(
        stab=StabConfig(**c['stab']), llm=LlamaConfig(**c['llm']),
        distill=DistillConfig(**dict(c['distill'], layers=tuple(c['distill']['layers']))),
        distill_weight=c['distill_weight'])
  raise ValueError(f'{CONFIG_FILE}: unknown model {model!r}')


def infer_panda_config(src, hf: dict, image_size: int = 448, stab_heads: int = 8) -> PandaConfig:
  """Video-Panda sizes from config.json plus the shapes of a few visual tensors.

  The STAB width and patch size come from the patch embedding, the teacher width from the
  distillation head, and the distillation layers from how many per-layer norms it has; the
  image size and STAB heads are not recorded in the weights (448 px and 8 in the release).
  """
  probe = {TOWER_PATCH, COMPRESSOR_INPUT} | {f'{COMPRESSOR_NORM}{j}.0.weight' for j in range(65)}
  shapes = {n: a.shape for n, a in hf_io.iter_tensors(src, names=probe)}
  if TOWER_PATCH not in shapes:
    raise ValueError(f'{src} has no {TOWER_PATCH}: not a Video-Panda checkpoint '
                     '(use --model=llama for a plain decoder)')
  hidden, _, patch, _ = shapes[TOWER_PATCH]
  teacher_hidden = shapes[COMPRESSOR_INPUT][0] if COMPRESSOR_INPUT in shapes else 1024
  n_norms = sum(1 for n in shapes if n.startswith(COMPRESSOR_NORM))
  cfg = panda_config_from_hf(hf, stab=StabConfig(hidden=hidden, heads=stab_heads,
                                                 patch_size=patch, image_size=image_size),
                             teacher_hidden=teacher_hidden, distill_heads=8)
  layers = cfg.llm.layers
  if n_norms >= 2 and layers % (n_norms - 1) == 0:
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(
        cfg.distill, layers=default_layers(layers, layers // (n_norms - 1))))
  cfg.validate()
  return cfg


def exported_config(src, hf: dict, model: str):
  """Our config from the `panda_jax` entry that `panda_jax.convert.export` writes into
  config.json (it records what the weights do not: image size, STAB heads, ...), or None for a
  checkpoint without one."""
  entry = hf.get('panda_jax')
  if not entry:
    return None
  try:
    found, cfg = config_from_json(entry)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{src}/config.json: its panda_jax entry is not a config we read ({e})')
  if found != model:
    want = 'video_panda' if found == 'video_panda' else 'llama'
    raise ValueError(f'{src} is an export of a {found!r} model (config.json: panda_jax); '
                     f'convert it with --model={want}')
  cfg.validate()
  return cfg


FORMATS = ('auto', 'hf', 'gguf')


def source_format(src, fmt: str = 'auto') -> str:
  """'hf' (a Hugging Face directory) or 'gguf' (a llama.cpp file); 'auto' goes by the suffix."""
  if fmt not in FORMATS:
    raise ValueError(f'format={fmt!r}; expected one of {list(FORMATS)}')
  if fmt != 'auto':
    return fmt
  return 'gguf' if str(src).lower().endswith('.gguf') else 'hf'


def convert_directory(src, dst, model: str = 'video_panda', llm_dtype: str = 'bfloat16',
                      image_size: int = 448, stab_heads: int = 8, fmt: str = 'auto') -> Any:
  """Converts `src` (a Hugging Face directory, or a GGUF Llama file: see `fmt`) into `dst`;
  returns our config."""
  if llm_dtype not in DTYPES:
    raise ValueError(f'llm_dtype={llm_dtype!r}; expected one of {sorted(DTYPES)}')
  fmt = source_format(src, fmt)
  if fmt == 'gguf' and model != 'llama':
    raise ValueError(f'{src} is a GGUF file, which holds a plain Llama decoder, but '
                     f'model={model!r}; use --model=llama')
  src = storage.local_copy(src)     # a gs:// release is copied to the local cache once
  dst = storage.path(dst)
  if storage.exists(dst / 'variables'):
    raise FileExistsError(f'{dst / "variables"} already exists; choose an empty --dst')
  tokenizer = None
  kept: dict[str, np.ndarray] = {}     # source tensors accepted and not converted
  if fmt == 'gguf':
    hf, tensors, tokenizer = gguf_io.read_gguf(src)
    cfg = config_from_hf(hf)
    variables = {'params': convert_llama(tensors, cfg, dtype=DTYPES[llm_dtype],
                                         tie_embeddings=hf['tie_word_embeddings'], kept=kept)}
    _save(dst, model, cfg, variables, tokenizer, kept)
    return cfg
  hf = hf_io.read_config(src)
  tie = hf.get('tie_word_embeddings', False)
  ours = exported_config(src, hf, model)
  if model == 'llama':
    cfg = ours or config_from_hf(hf)
    variables = {'params': convert_llama(_progress(src), cfg, dtype=DTYPES[llm_dtype],
                                         tie_embeddings=tie, kept=kept)}
  elif model == 'video_panda':
    cfg = ours or infer_panda_config(src, hf, image_size, stab_heads)
    variables = convert_panda(_progress(src), cfg, llm_dtype=DTYPES[llm_dtype],
                              tie_embeddings=tie, kept=kept)
  else:
    raise ValueError(f'model={model!r}; expected llama or video_panda')
  _save(dst, model, cfg, variables, kept=kept)
  return cfg


def _save(dst, model: str, cfg, variables, tokenizer=None, kept=None) -> None:
  """Writes the Orbax variables, our config, the `kept` tensors (UNUSED_FILE, when there are
  any) and (if given) the tokenizer's files to `dst`."""
  storage.makedirs(dst)
  write_unused(dst, kept or {})
  ckptr = ocp.StandardCheckpointer()
  # Stored in chunks of at most CHUNK_BYTES: a process restoring its shards reads only the
  # chunks they overlap (benchmarks/restore_memory.py: a 2 x 4 process then peaks at about
  # half of a 1 x 8 one; whole-array chunks, 0.8).
  ckptr.save(dst / 'variables', variables, save_args=jax.tree.map(
      lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), variables))
  ckptr.wait_until_finished()
  storage.write_json(dst / CONFIG_FILE, config_to_json(model, cfg), indent=2)
  if tokenizer is not None:
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer.save_pretrained(tmp)
      storage.upload_tree(tmp, dst)


def write_unused(dst, kept) -> None:
  """Writes `kept` (name -> array, as read from the source) as `dst`/UNUSED_FILE, dtypes and
  bytes unchanged; with nothing kept, removes a stale one."""
  target = storage.join(dst, UNUSED_FILE)
  if not kept:
    storage.remove(target)
    return
  hf_io.write_safetensors(target, kept, metadata={'format': 'pt'})


def read_unused(dst) -> dict[str, np.ndarray]:
  """The source tensors converted checkpoint `dst` kept and did not convert (UNUSED_FILE:
  name -> array, as the source held it); {} when it has none (a training workdir, a checkpoint
  converted before the file existed)."""
  target = storage.join(dst, UNUSED_FILE)
  if not storage.isfile(target):
    return {}
  return hf_io.load_tensors(storage.local_copy(target))


def read_converted_config(dst):
  """-> (model name, config) of converted checkpoint `dst`, without reading its weights."""
  return config_from_json(storage.read_json(storage.path(dst) / CONFIG_FILE))


def load_converted(dst, shardings=None):
  """-> (model name, config, variables). Without `shardings`, every array whole in host
  memory (for another topology or a single-device evaluation); with `shardings` (a tree
  matching the variables), each array restored directly into its sharded layout. To take
  only the variables a model shares with the checkpoint, sharded, see
  `panda_jax.train.checkpoint.load_converted_params`."""
  dst = storage.path(dst)
  model, cfg = read_converted_config(dst)
  ckptr = ocp.StandardCheckpointer()
  if shardings is None:
    variables = ckptr.restore(dst / 'variables')
  else:
    meta = ckptr.metadata(dst / 'variables')
    tree = meta.item_metadata if hasattr(meta, 'item_metadata') else meta
    abstract = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings)
    variables = ckptr.restore(dst / 'variables', abstract)
  return model, cfg, variables


def define_flags() -> None:
  """The command line's flags (defined when run as a program, never at import)."""
  flags.DEFINE_string('src', None, 'Released checkpoint directory (config.json + weights), or a '
                      'GGUF Llama file (with --model=llama).')
  flags.DEFINE_string('dst', None, 'Output directory (created; must not hold variables/).')
  flags.DEFINE_enum('model', 'video_panda', ['video_panda', 'llama'], 'What the checkpoint holds.')
  flags.DEFINE_enum('llm_dtype', 'bfloat16', sorted(DTYPES),
                    'Storage dtype of the decoder weights.')
  flags.DEFINE_enum('format', 'auto', list(FORMATS),
                    'Source format: hf (a Hugging Face directory), gguf (a llama.cpp file), auto '
                    '(gguf when --src ends in .gguf).')
  flags.DEFINE_integer('image_size', 448, 'Student frame size (not in the weights).')
  flags.DEFINE_integer('stab_heads', 8, 'STAB attention heads (not in the weights).')


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.src or not f.dst:
    raise app.UsageError('--src and --dst are required')
  t0 = time.perf_counter()
  cfg = convert_directory(f.src, f.dst, f.model, f.llm_dtype, f.image_size, f.stab_heads,
                          f.format)
  print(f'converted {f.model} from {f.src} to {f.dst} in {time.perf_counter() - t0:.0f}s; '
        f'config: {cfg}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
