"""Llama-2 decoder (Vicuna-7B v1.5 lineage) in Flax linen, with a functional KV cache.

Spec section 4. Layers are stacked with `nn.scan` (parameters get a leading `layers` axis) and
wrapped in `nn.remat` with a policy from config. Every parameter and the main activations carry
logical axis names; `panda_jax/sharding.py` maps them to the mesh.

Shapes: B batch, T new tokens, S cache slots, E hidden, H query heads, K key/value heads,
D head dim, M MLP width, V vocab, L layers.

Attention masks are built from two arrays so one code path serves training, prefill and
decoding: each new token has a `slot` (its absolute position: the RoPE position and, with a
cache, where its key/value are written) and a `valid` flag. A query at slot q attends to every
valid key at slot <= q.

With `cfg.lora` (a `LoraConfig` of rank > 0) the targeted projections add a LoRA branch
(`panda_jax/models/lora.py`); its dropout applies only to calls with `deterministic=False`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from panda_jax.models.layers import Dense, partitioned
from panda_jax.models.lora import LoraConfig
from panda_jax.models.lora import from_dict as lora_from_dict

Dtype = Any

REMAT_POLICIES = {
    'none': None,  # no rematerialisation
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# Attention kernels for the uncached forward (training, scoring); see `Attention`.
ATTENTION_IMPLS = ('xla', 'splash', 'cudnn')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Decoder sizes; defaults are Vicuna-7B v1.5 / Llama-2 7B."""
  vocab_size: int = 32000
  hidden: int = 4096
  layers: int = 32
  heads: int = 32
  kv_heads: int = 32
  head_dim: int = 128
  mlp: int = 11008
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_positions: int = 4096
  remat: str = 'none'
  # Query-block attention: > 0 computes attention for blocks of this many queries at a time,
  # each block rematerialised in the backward pass, so the [heads, T, S] score matrix never
  # exists whole (exact: every block's softmax spans all keys). Used when T is a multiple of
  # it and larger; 0 = one block.
  attention_chunk: int = 0
  # Stack layers with nn.scan (one compiled layer; the training layout). False keeps one
  # module per layer (`layers_0`, ...), which decodes faster on CPU where scan copies each
  # layer's weights every step; `unstack_layers` / `stack_layers` convert parameters.
  scan_layers: bool = True
  # Attention of the uncached forward (training), whose slots must be 0..T-1: 'xla' the
  # einsum attention (`_attend`, in query blocks by attention_chunk; exact, any backend); 'splash' the Pallas TPU splash-attention kernel (TPU; sequence a multiple of
  # 128); 'cudnn' cuDNN's fused attention through jax.nn.dot_product_attention (NVIDIA GPUs).
  # Calls with a KV cache (generation) always use 'xla'.
  attention_impl: str = 'xla'
  # 'splash' only: run the kernel in the Pallas interpreter (any backend, slow) -- how the
  # CPU tests check its numbers.
  attention_interpret: bool = False
  # Training loss in blocks of this many positions (`panda.chunked_cross_entropy`): the LM
  # head's float32 logits exist for one block [B, chunk, V] at a time and are recomputed in the
  # backward pass, never for the whole sequence [B, T, V]; exact. The model then returns no
  # logits. 0 = the whole sequence at once.
  loss_chunk: int = 0
  # Training loss from the LM head at this many positions of a sequence only: the first K
  # positions whose next token is learned (an answer's), gathered before the head, so the
  # [B, T, V] logits are never formed for the prompt and the visual tokens; exact while no
  # sequence has more than K learned tokens (the training loop refuses a batch that does).
  # Takes precedence over loss_chunk. 0 = every position.
  loss_positions: int = 0
  # RMS-normalise each head's queries and keys (learned scale per channel) before the rotary
  # embedding, as OLMo 2 and Qwen 3 do: bounds the attention logits, whose growth saturates
  # the softmax of a small decoder trained from scratch at a high learning rate
  # (docs/changelog.md, 2026-12-01). Not in Llama / Vicuna: False for every released
  # model and converted checkpoint.
  qk_norm: bool = False
  # The LM head is the token embedding's transpose (no `lm_head` parameter), as in GPT-2 and
  # Gemma. Llama-2 / Vicuna keep them apart: False for every released model.
  tie_embeddings: bool = False
  # LoRA on the projections it targets (`config.model.lora`; rank 0, the default: none). Kept
  # here so every user of the decoder (training, the Predictor's decoding) applies it.
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    if not isinstance(self.lora, LoraConfig):   # from JSON (a converted checkpoint's config)
      object.__setattr__(self, 'lora', lora_from_dict(self.lora))

  def validate(self) -> None:
    self.lora.validate()
    if self.heads % self.kv_heads:
      raise ValueError(f'heads={self.heads} is not a multiple of kv_heads={self.kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings')
    if self.attention_chunk < 0:
      raise ValueError(f'attention_chunk={self.attention_chunk} must be >= 0 (0 = off)')
    if self.loss_chunk < 0:
      raise ValueError(f'loss_chunk={self.loss_chunk} must be >= 0 (0 = off)')
    if self.loss_positions < 0:
      raise ValueError(f'loss_positions={self.loss_positions} must be >= 0 (0 = every position)')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r}; expected one of '
                       f'{list(ATTENTION_IMPLS)}')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}')

  @property
  def num_params(self) -> int:
    e, m, d = self.hidden, self.mlp, self.head_dim
    per_layer = (e * d * (2 * self.heads + 2 * self.kv_heads) + 3 * e * m + 2 * e
                 + (2 * d if self.qk_norm else 0))
    heads = 1 if self.tie_embeddings else 2
    return self.layers * per_layer + heads * self.vocab_size * e + e


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = 'embed'   # the logical axis of the normalised (last) dimension

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', partitioned(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    # As Hugging Face: normalise in float32, cast back, then scale.
    return scale.astype(self.dtype) * xf.astype(self.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Llama rotary embedding (half-split convention): x [B, T, N, D], positions [B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, D/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(q_slots: jax.Array, k_slots: jax.Array, k_valid: jax.Array) -> jax.Array:
  """bool [B, T, S]: key s is visible to query t if valid and not in the future."""
  return k_valid[:, None, :] & (k_slots[:, None, :] <= q_slots[:, :, None])


def _attend(qg, keys, values, q_slots, k_slots, k_valid, dtype):
  """Softmax attention of grouped queries qg [B, T, K, G, D] over keys/values [B, S, K, D]."""
  mask = attention_mask(q_slots, k_slots, k_valid)
  scores = jnp.einsum('btkgd,bskd->bkgts', qg, keys, preferred_element_type=jnp.float32)
  scores = scores * qg.shape[-1] ** -0.5
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum('bkgts,bskd->btkgd', probs, values)


def chunked_attention(qg, keys, values, q_slots, k_slots, k_valid, dtype, chunk: int):
  """`_attend` over blocks of `chunk` queries (T a multiple of it), one block at a time; each
  block is recomputed in the backward pass, so only one block's scores are ever live."""
  b, t = qg.shape[:2]
  n = t // chunk
  blocks = qg.reshape((b, n, chunk) + qg.shape[2:]).swapaxes(0, 1)
  slots = q_slots.reshape(b, n, chunk).swapaxes(0, 1)
  one = jax.checkpoint(lambda q, sl: _attend(q, keys, values, sl, k_slots, k_valid, dtype),
                       prevent_cse=False)
  out = jax.lax.map(lambda xs: one(*xs), (blocks, slots))        # [n, B, chunk, K, G, D]
  return out.swapaxes(0, 1).reshape(qg.shape[:4] + values.shape[-1:])


SPLASH_LANES = 128  # the splash kernel's key blocks are multiples of this


def _splash_block(t: int) -> int:
  """The largest of 512, 256, 128 dividing the sequence length `t`."""
  for b in (512, 256, 128):
    if t % b == 0:
      return b
  raise ValueError(f'attention_impl=splash needs a sequence length that is a multiple of '
                   f'{SPLASH_LANES}; got {t} (pad data.max_len, or use attention_impl=xla)')


def splash_attention(qg, keys, values, valid, dtype, interpret: bool = False):
  """Causal attention of qg [B, T, K, G, D] over keys/values [B, T, K, D] by the Pallas TPU
  splash kernel; the key at slot s is visible to the query at slot t if s <= t and both are
  valid (segment ids), which equals `_attend` at every valid query when slots are 0..T-1.

  A padding query sees only padding keys here (`_attend` lets it see the valid ones); nothing
  reads the outputs at padding positions (later layers never attend to them, labels there are
  IGNORE), so losses and gradients are the same.

  Under a mesh the kernel runs per shard (`shard_map` over batch and heads, with the
  partitioning the logical-axis rules give `act_batch` and `act_heads`), since XLA cannot
  partition a Pallas call itself.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, t, k, g, d = qg.shape
  blk = _splash_block(t)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                        block_kv_dq=blk)
  # The kernel takes no scale: fold it into the queries (in float32, then back).
  q = (qg.astype(jnp.float32) * d ** -0.5).astype(qg.dtype)
  q = q.reshape(b, t, k * g, d).transpose(0, 2, 1, 3)
  kt, vt = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)     # [B, K, T, D]
  seg = valid.astype(jnp.int32)

  def local(q, kt, vt, seg):
    mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * q.shape[1])
    kernel = sk.make_splash_mha(mask=mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    ids = sk.SegmentIds(q=seg, kv=seg)
    return jax.vmap(kernel)(q, kt, vt, segment_ids=ids)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    heads = nn.logical_to_mesh_axes(('act_batch', 'act_heads', None, None))
    rows = PartitionSpec(heads[0], None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, rows),
                          out_specs=heads, check_vma=False)
  out = local(q, kt, vt, seg)                                       # [B, H, T, D]
  return out.transpose(0, 2, 1, 3).reshape(b, t, k, g, d).astype(dtype)


def cudnn_attention(qg, keys, values, valid, dtype, implementation: str = 'cudnn'):
  """Causal attention of qg [B, T, K, G, D] over keys/values [B, T, K, D] by
  `jax.nn.dot_product_attention` (cuDNN's fused kernel; `implementation='xla'` is the same call
  on any backend, which is how the CPU tests check the arguments). Padding is given as key
  lengths, so `valid` must be a prefix of each row (the layout `layout_batch` writes); with
  slots 0..T-1 this equals `_attend` at every query, padding queries included."""
  b, t, k, g, d = qg.shape
  lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
  out = jax.nn.dot_product_attention(
      qg.reshape(b, t, k * g, d), keys, values, is_causal=True,
      key_value_seq_lengths=lengths, implementation=implementation)
  return out.reshape(b, t, k, g, d).astype(dtype)


# Each LoRA projection's dropout key: the layer's key folded with this number.
_PROJECTION_IDS = {'attn/q': 0, 'attn/k': 1, 'attn/v': 2, 'attn/o': 3, 'mlp/gate': 4,
                   'mlp/up': 5, 'mlp/down': 6}


def _projection(lora: LoraConfig, name: str, dropout_rng, features, in_axes, out_axes, **kw):
  """The decoder projection `name` ('attn/q', ...) as a bias-free Dense (with LoRA when
  `lora` targets it) and the dropout key of its LoRA branch; -> a function of x."""
  layer = Dense(features, in_axes, out_axes, use_bias=False, name=name.split('/')[1],
                lora=lora.for_projection(name), **kw)
  key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, _PROJECTION_IDS[name])
  return lambda x: layer(x, key)


class Attention(nn.Module):
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, slots, valid, cache, dropout_rng=None):
    """x [B, T, E]; slots int [B, T]; valid bool [B, T]; cache None or dict of k, v
    [B, S, K, D], slots int [B, S], valid bool [B, S] (already including this step's tokens);
    dropout_rng: the LoRA dropout's key (None: none).
    Returns (y [B, T, E], (k, v) written for this step)."""
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, k, d = cfg.heads, cfg.kv_heads, cfg.head_dim
    proj = lambda name, *a: _projection(self.cfg.lora, name, dropout_rng, *a, **kw)
    q = proj('attn/q', (h, d), ('embed',), ('heads', 'kv'))(x)
    kk = proj('attn/k', (k, d), ('embed',), ('kv_heads', 'kv'))(x)
    vv = proj('attn/v', (k, d), ('embed',), ('kv_heads', 'kv'))(x)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_eps, axis_name='kv', name='q_norm', **kw)(q)
      kk = RMSNorm(cfg.rms_eps, axis_name='kv', name='k_norm', **kw)(kk)
    q = rotary(q, slots, cfg.rope_theta)
    kk = rotary(kk, slots, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ('act_batch', 'act_length', 'act_heads', None))
    if cache is None:
      keys, values = kk, vv
      k_slots, k_valid = slots, valid
    else:
      b = jnp.arange(x.shape[0])[:, None]
      keys = cache['k'].at[b, slots].set(kk.astype(cache['k'].dtype))
      values = cache['v'].at[b, slots].set(vv.astype(cache['v'].dtype))
      k_slots, k_valid = cache['slots'], cache['valid']
    b_, t, _, _ = q.shape
    qg = q.reshape(b_, t, k, h // k, d)
    args = (qg, keys.astype(self.dtype), values.astype(self.dtype), slots, k_slots, k_valid,
            self.dtype)
    c = cfg.attention_chunk
    impl = 'xla' if cache is not None else cfg.attention_impl
    if impl == 'splash':
      out = splash_attention(qg, args[1], args[2], valid, self.dtype,
                             interpret=cfg.attention_interpret)
    elif impl == 'cudnn':
      out = cudnn_attention(qg, args[1], args[2], valid, self.dtype)
    elif 0 < c < t and t % c == 0:
      out = chunked_attention(*args, chunk=c)
    else:
      out = _attend(*args)
    out = out.reshape(b_, t, h, d)
    y = proj('attn/o', cfg.hidden, ('heads', 'kv'), ('embed',))(out)
    return y, (keys, values)


class MLP(nn.Module):
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, dropout_rng=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name, *a: _projection(self.cfg.lora, name, dropout_rng, *a, **kw)
    gate = proj('mlp/gate', self.cfg.mlp, ('embed',), ('mlp',))(x)
    up = proj('mlp/up', self.cfg.mlp, ('embed',), ('mlp',))(x)
    hmid = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                      ('act_batch', 'act_length', 'act_mlp'))
    return proj('mlp/down', self.cfg.hidden, ('mlp',), ('embed',))(hmid)


class DecoderLayer(nn.Module):
  """Pre-norm block; scanned over layers. Carry x [B, T, E]; per-layer cache slice; the
  layer's LoRA dropout key (None: no dropout)."""
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, layer_cache, slots, valid, cache_meta, gather, dropout_rng=None):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cache = None if layer_cache is None else dict(layer_cache, **cache_meta)
    a, kv = Attention(cfg, name='attn', **kw)(
        RMSNorm(cfg.rms_eps, name='attn_norm', **kw)(x), slots, valid, cache, dropout_rng)
    x = x + a
    x = x + MLP(cfg, name='mlp', **kw)(RMSNorm(cfg.rms_eps, name='mlp_norm', **kw)(x),
                                       dropout_rng)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    out = x if gather is None else jnp.take_along_axis(x, gather[..., None], axis=1)
    new_cache = None if layer_cache is None else {'k': kv[0], 'v': kv[1]}
    return x, (new_cache, out)


class Llama(nn.Module):
  """Token embedding, scanned decoder layers, final RMSNorm and untied LM head; LoRA on the
  projections `cfg.lora` targets (rank 0: none)."""
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden, param_dtype=self.param_dtype, dtype=self.dtype,
        embedding_init=partitioned(nn.initializers.normal(0.02), ('vocab', 'embed')))
    layer = DecoderLayer
    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != 'none':
      layer = nn.remat(layer, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
          length=cfg.layers, metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, **kw)
    else:
      self.layer_list = [layer(cfg, name=f'layers_{i}', **kw)
                         for i in range(cfg.layers)]
    self.final_norm = RMSNorm(cfg.rms_eps, **kw)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg.vocab_size, ('embed',), ('vocab',), use_bias=False, **kw)

  def embed(self, ids: jax.Array) -> jax.Array:
    """ids [B, T] -> [B, T, E]."""
    return self.embed_tokens(ids)

  def head_kernel(self) -> jax.Array:
    """The LM head's kernel [E, V] (for a loss that applies it block by block)."""
    if self.cfg.tie_embeddings:
      return nn.unbox(self.embed_tokens.variables['params']['embedding']).T
    return nn.unbox(self.lm_head.variables['params']['kernel'])

  def _head(self, x: jax.Array) -> jax.Array:
    if self.cfg.tie_embeddings:
      return self.embed_tokens.attend(x)
    return self.lm_head(x)

  def __call__(self, inputs_embeds, slots, valid, *, cache=None, hidden_gather=None,
               output_hidden_states=False, logits_gather=None, logits=True,
               deterministic=True):
    """Runs the decoder.

    Args:
      inputs_embeds: [B, T, E].
      slots: int [B, T] absolute positions of the tokens (RoPE and cache slots).
      valid: bool [B, T] real tokens (padding is never attended to).
      cache: None (no cache) or `init_cache(...)`-shaped dict; the step's keys and values are
        written at `slots` and `cache['valid']` must already mark them (see `step_cache`).
      hidden_gather: optional int [B, P] positions at which to return hidden states.
      output_hidden_states: return all L + 1 hidden states in Hugging Face numbering
        (0 = embeddings, L = after the final norm).
      logits_gather: optional int [B, P]: compute logits only at these positions (prefill
        needs one per sequence, not [B, T, V]).
      logits: False returns the final-norm output `normed` [B, T, E] instead of logits (a
        chunked loss applies `head_kernel()` to it block by block).
      deterministic: False applies the LoRA dropout (`lora.dropout` > 0), with keys from the
        `dropout` RNG; nothing else in the decoder is random.
    Returns:
      dict with `logits` [B, T or P, V] (float32) or `normed`, `hidden_states`
      [L + 1, B, T or P, E] when asked, `cache` when given.
    """
    if self.is_initializing():  # create the embedding table even when given embeddings
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
    x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype),
                                   ('act_batch', 'act_length', 'act_embed'))
    layer_cache = None if cache is None else {'k': cache['k'], 'v': cache['v']}
    meta = None if cache is None else {'slots': cache['slots'], 'valid': cache['valid']}
    gather = hidden_gather if output_hidden_states else None
    # One LoRA dropout key per layer (scanned over with the layers), or None: no dropout.
    keys = None
    if not deterministic and self.cfg.lora.enabled and self.cfg.lora.dropout > 0:
      keys = jax.random.split(self.make_rng('dropout'), self.cfg.layers)
    if self.cfg.scan_layers:
      x_last, (new_cache, outs) = self.layers(x, layer_cache, slots, valid, meta, gather, keys)
    else:
      x_last, caches, out_list = x, [], []
      for i, layer in enumerate(self.layer_list):
        lc = None if layer_cache is None else jax.tree.map(lambda a: a[i], layer_cache)
        x_last, (c, o) = layer(x_last, lc, slots, valid, meta, gather,
                               None if keys is None else keys[i])
        caches.append(c)
        out_list.append(o)
      new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches)
      outs = jnp.stack(out_list)
    normed = self.final_norm(x_last)
    if logits:
      head_in = normed if logits_gather is None else jnp.take_along_axis(
          normed, logits_gather[..., None], axis=1)
      out = self._head(head_in).astype(jnp.float32)
      result = {'logits': nn.with_logical_constraint(
          out, ('act_batch', 'act_length', 'act_vocab'))}
    else:
      if self.is_initializing() and not self.cfg.tie_embeddings:  # create the head's kernel
        self.lm_head(normed[:, :1])
      result = {'normed': normed}
    if output_hidden_states:
      pick = (lambda a: a) if gather is None else (
          lambda a: jnp.take_along_axis(a, gather[..., None], axis=1))
      result['hidden_states'] = jnp.concatenate(
          [pick(x)[None], outs[:-1], pick(normed)[None]], axis=0)
    if cache is not None:
      result['cache'] = dict(cache, k=new_cache['k'], v=new_cache['v'])
    return result


def init_cache(cfg: LlamaConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
  """An empty KV cache: k, v [L, B, S, K, D], slot positions [B, S], valid [B, S]."""
  shape = (cfg.layers, batch, slots, cfg.kv_heads, cfg.head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'slots': jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots)),
          'valid': jnp.zeros((batch, slots), bool)}


def step_cache(cache: dict, slots: jax.Array, valid: jax.Array) -> dict:
  """Marks this step's tokens (slots [B, T], valid [B, T]) in the cache's validity map."""
  b = jnp.arange(slots.shape[0])[:, None]
  return dict(cache, valid=cache['valid'].at[b, slots].set(valid))


def unstack_layers(params: dict, num_layers: int) -> dict:
  """Scanned parameters (`layers` with a leading axis) -> one subtree per layer."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda a: a[i], params['layers'])
  return out


def stack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of `unstack_layers`."""
  out = {k: v for k, v in params.items() if not k.startswith('layers_')}
  out['layers'] = jax.tree.map(lambda *a: jnp.stack(a),
                               *[params[f'layers_{i}'] for i in range(num_layers)])
  return out
