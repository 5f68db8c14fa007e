"""Prefill + KV-cache decoding for the Llama decoder (greedy, temperature, top-p).

One compiled program per (batch, prompt length, max_new_tokens, sampling settings): the
prompt may hold any embeddings (text or text + video tokens), right padded; every sequence
continues from its own length and stops at its own end-of-sequence id.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from panda_jax.models.llama import Llama, init_cache, step_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_p < 1 keeps the smallest set of tokens with that mass."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  eos_id: int | None = 2
  pad_id: int = 0

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={self.max_new_tokens} must be at least 1')
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1]')


def pick_token(logits: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
  """logits [B, V] -> ids [B]."""
  if s.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / s.temperature
  if s.top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of strictly better tokens
    sorted_logits = jnp.where(before < s.top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'sampling', 'return_logits', 'stream'))
def generate(model: Llama, params, prompt_embeds: jax.Array, prompt_valid: jax.Array,
             rng: jax.Array, sampling: Sampling, return_logits: bool = False,
             stream: Callable[[jax.Array, jax.Array], None] | None = None) -> dict:
  """Decodes after a right-padded prompt.

  Args:
    model: the `Llama` module (static).
    params: its parameters.
    prompt_embeds: [B, T, E]; prompt_valid: bool [B, T], True on each prompt's first n_b slots.
    rng: PRNG key (unused when greedy).
    stream: optional host function called as each token is chosen, in order, with the step i
      and the tokens int32 [B] of that step (pad for finished sequences). Static: pass the same
      object for every call, or each new one compiles the program again.
  Returns:
    dict: `tokens` int32 [B, N] (pad after each sequence's end-of-sequence id, which is kept),
    `lengths` int32 [B] generated tokens per sequence (end id included), and with
    `return_logits` the next-token `logits` [B, N, V] of every step.
  """
  s = sampling
  b, t, _ = prompt_embeds.shape
  n = s.max_new_tokens
  lengths = jnp.sum(prompt_valid, axis=1).astype(jnp.int32)
  cache = init_cache(model.cfg, b, t + n, dtype=model.dtype)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cache = step_cache(cache, slots, prompt_valid)
  last_pos = jnp.maximum(lengths - 1, 0)[:, None]
  out = model.apply({'params': params}, prompt_embeds, slots, prompt_valid, cache=cache,
                    logits_gather=last_pos)
  logits0 = out['logits'][:, 0]
  vocab = logits0.shape[-1]

  def emit(i, logits, done, tokens, all_logits, rng):
    """Chooses token i from `logits`; returns the updated bookkeeping."""
    rng, sub = jax.random.split(rng)
    tok = jnp.where(done, s.pad_id, pick_token(logits, sub, s))
    tokens = tokens.at[:, i].set(tok)
    if stream is not None:
      jax.debug.callback(stream, i, tok, ordered=True)
    if return_logits:
      all_logits = all_logits.at[:, i].set(logits)
    now_done = done if s.eos_id is None else done | (tok == s.eos_id)
    return tok, now_done, tokens, all_logits, rng

  def body(state):
    # Feeds token i - 1 and picks token i: n - 1 forwards after the prefill.
    i, cache, tok, done_before, done, tokens, all_logits, rng = state
    slot = (lengths + i - 1)[:, None]
    live = ~done_before[:, None]
    cache = step_cache(cache, slot, live)
    emb = model.apply({'params': params}, tok[:, None], method=Llama.embed)
    step = model.apply({'params': params}, emb, slot, live, cache=cache)
    tok, now_done, tokens, all_logits, rng = emit(i, step['logits'][:, 0], done, tokens,
                                                  all_logits, rng)
    return i + 1, step['cache'], tok, done, now_done, tokens, all_logits, rng

  def cond(state):
    i, _, _, _, done, *_ = state
    return (i < n) & ~jnp.all(done)

  tokens = jnp.full((b, n), s.pad_id, jnp.int32)
  all_logits = jnp.zeros((b, n, vocab) if return_logits else (0,), jnp.float32)
  not_done = jnp.zeros(b, bool)
  tok, done, tokens, all_logits, rng = emit(0, logits0, not_done, tokens, all_logits, rng)
  state = (jnp.int32(1), out['cache'], tok, not_done, done, tokens, all_logits, rng)
  _, _, _, _, _, tokens, all_logits, _ = jax.lax.while_loop(cond, body, state)
  if s.eos_id is None:
    gen_len = jnp.full((b,), n, jnp.int32)
  else:
    is_eos = tokens == s.eos_id
    first = jnp.argmax(is_eos, axis=1)
    gen_len = jnp.where(jnp.any(is_eos, axis=1), first + 1, n).astype(jnp.int32)
  result = {'tokens': tokens, 'lengths': gen_len}
  if return_logits:
    result['logits'] = all_logits
  return result
