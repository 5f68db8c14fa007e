"""Answering questions about videos: prompt, layout, visual tokens, KV-cache decoding, text.

The host builds each prompt (the conversation template, `data.templates`: `videopanda_v1` by
default, `chatml` for SmolLM2; one `<image>` per frame) and lays the batch out;
the device embeds, then decodes with the per-layer decoder layout (faster than the scanned
training layout for token-by-token work). Prompt lengths are rounded up to a multiple of
`length_bucket`, so a handful of compiled programs serve any questions.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import storage
from panda_jax.data import templates, text
from panda_jax.data.assembly import layout_batch
from panda_jax.eval.generate import Sampling, generate
from panda_jax.models.llama import Llama, unstack_layers
from panda_jax.models.panda import PandaConfig, VideoPanda


class Predictor:
  """Video question answering with a loaded Video-Panda model.

  Args:
    cfg, variables: the model (e.g. from `panda_jax.convert.checkpoint.load_converted`).
    tokenizer: from `panda_jax.data.text.load_tokenizer` (or `load_text`).
    sampling: decoding settings; `eos_id` defaults to the template's end-of-turn id (`</s>`
      for the Vicuna templates, `<|im_end|>` for chatml). Pass the same id when giving one.
    length_bucket: prompt lengths are padded up to a multiple of this.
    template: the conversation template, a `templates.Template` or its name.
  """

  def __init__(self, cfg: PandaConfig, variables: dict, tokenizer: Any,
               sampling: Sampling | None = None, length_bucket: int = 64,
               template: str | templates.Template = templates.DEFAULT):
    self.cfg = cfg
    self.tokenizer = tokenizer
    self.template = templates.get(template) if isinstance(template, str) else template
    self.template.check(tokenizer)
    eos = self.template.stop_id(tokenizer)
    self.sampling = sampling or Sampling(max_new_tokens=128, eos_id=eos)
    self.sampling.validate()
    self.bucket = length_bucket
    self.variables = variables
    self.decoder = Llama(dataclasses.replace(cfg.llm, scan_layers=False))
    self.decoder_params = unstack_layers(variables['params']['llm'], cfg.llm.layers)
    model = VideoPanda(cfg)
    self._embed = jax.jit(lambda v, b: model.apply(v, b, method=lambda m, x: m.embed_inputs(x)[0]))

  def prompt_ids(self, question: str, frames: int) -> np.ndarray:
    """int32 [T]: the template's generation prompt for `question` with `frames` image ids."""
    return self.template.generation_ids(self.tokenizer, question, num_frames=frames)

  def generate_ids(self, pixels, mask, questions: Sequence[str], rng=None,
                   stream=None) -> list[np.ndarray]:
    """pixels [B, F, H, W, 3], mask [B, F, H, W], B questions -> B arrays of new token ids
    (without the end-of-sequence id). `stream`: see `generate` (called with each step's
    tokens [B] while decoding)."""
    b, f = np.shape(mask)[:2]
    if len(questions) != b:
      raise ValueError(f'{len(questions)} questions for a batch of {b} videos')
    ids = [self.prompt_ids(q, f) for q in questions]
    t = max(len(i) for i in ids)
    padded = np.zeros((b, t), np.int32)
    am = np.zeros((b, t), np.int32)
    for i, row in enumerate(ids):
      padded[i, :len(row)] = row
      am[i, :len(row)] = 1
    longest = t - f + f * self.cfg.stab.max_frame_tokens
    max_len = -(-longest // self.bucket) * self.bucket
    lay = layout_batch(padded, None, am, np.asarray(mask), self.cfg.stab, max_len=max_len)
    batch = {k: jnp.asarray(v) for k, v in lay.items()}
    batch.update(pixels=jnp.asarray(pixels), mask=jnp.asarray(mask))
    embeds = self._embed(self.variables, batch)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out = generate(self.decoder, self.decoder_params, embeds, batch['valid'], rng, self.sampling,
                   stream=stream)
    tokens, lengths = np.asarray(out['tokens']), np.asarray(out['lengths'])
    eos = self.sampling.eos_id
    result = []
    for i in range(b):
      row = tokens[i, :lengths[i]]
      if eos is not None and len(row) and row[-1] == eos:
        row = row[:-1]
      result.append(row)
    return result

  def answer(self, pixels, mask, questions: Sequence[str], rng=None, stream=None) -> list[str]:
    """The decoded answers, one string per video."""
    return [self.tokenizer.decode(r, skip_special_tokens=True).strip()
            for r in self.generate_ids(pixels, mask, questions, rng, stream)]


def workdir_data_field(checkpoint: str, name: str) -> str:
  """`data.<name>` of a training workdir's `config.json`, '' when `checkpoint` has no
  config.json (a converted release) or it names none. A config.json that is not a JSON object
  (with `data` an object, if present) raises ValueError naming it."""
  path = storage.join(checkpoint, 'config.json')
  try:
    config = storage.read_json(path)
  except FileNotFoundError:
    return ''
  data = config.get('data', {}) if isinstance(config, dict) else None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object whose "data" is an object (a training '
                     f'workdir\'s config), got {json.dumps(config)[:100]}')
  return data.get(name) or ''


def load_text(tokenizer_dir: str, template: str = '', system: str | None = None,
              checkpoint: str = '') -> tuple[Any, templates.Template]:
  """The tokenizer and conversation template to answer with (the CLIs' door).

  The template: `template` when given (a `templates.NAMES` name); else the training workdir's
  own (`checkpoint`/config.json's `data.system_prompt`); else `chatml` when the tokenizer's
  chat template is ChatML (SmolLM2), else `videopanda_v1` (the reference's inference).
  `system`: replaces the template's system message (None: its own). The tokenizer is loaded
  the way the template needs (`text.load_tokenizer`'s `force_bos`).
  Raises:
    ValueError for an unknown template name, a tokenizer that cannot write the template, or
    a `checkpoint`/config.json that is not a training config (`workdir_data_field`).
  """
  if not template and checkpoint:
    template = workdir_data_field(checkpoint, 'system_prompt')
  if template:
    chosen = templates.get(template, system)
    tok = text.load_tokenizer(tokenizer_dir, force_bos=chosen.force_bos)
  else:
    tok = text.load_tokenizer(tokenizer_dir)
    chosen = templates.get(templates.default_name(tok), system)
  try:
    chosen.check(tok)
  except ValueError as e:
    raise ValueError(f'tokenizer {tokenizer_dir} cannot write the {chosen.name!r} conversation '
                     f'template: {e}') from e
  return tok, chosen
