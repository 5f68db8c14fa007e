"""Can the demo's decoder learn "is the X visible at the start" from ideal visual tokens?

A sandbox for issue 10's open question. The demo's decoder (`Llama`, 4 layers x 128, qk-norm)
reads symbolic "visual tokens" instead of the STAB's: 4 frames of a 4 x 4 grid, a cell either
background or one shape, the token a small learned MLP of (colour, kind, cell) embeddings. The
first shape is there from frame 0, the second (on half the clips) enters on frame 1, as in the
demo's clips; colours differ within a clip. Each sample asks whether a named shape is visible
at the start (answer yes / no, the only tokens learned). Question layouts (`--fmt`):

  std    is the <colour> <kind> visible start ? ASSISTANT -> answer (the demo's short form:
         the answer is predicted at a template token, which must first fetch the name)
  prev   is the visible start ? ASSISTANT <colour> <kind> -> answer (predicted at the name,
         as `data.name_first` sentence answers do)
  last   ... <kind> <colour> -> answer (predicted at the colour word itself)

`--fmt=std,prev` mixes layouts per sample; `--eval_fmt` scores another layout than the first.
Measured on this CPU (2026-12-02, 2,000 steps of batch 8, lr 2e-3, seed 0; always "yes": 0.746):
std stays at "yes" with seed 0 (0.742) while its loss falls to the per-clip level (0.36: sure
on one-shape clips, 50/50 on two-shape ones) and with seed 1 learns the check only after step
1,000 (0.881 at 2,000); last reaches 0.914 by step 1,000, prev 0.88, and std and prev half
and half, scored on std, 0.850: answers made at the name are learned sooner from clean tokens,
and a mix carries the check to the short form.

`--tokens_from=WORKDIR` trains on the frozen visual tokens a demo workdir's trained STAB and
projector make of its training clips instead (`--stage`, `--clips`, the last `--held_out`
scored on every shape; cached in WORKDIR/binding/), fed as the decoder receives them
(`--inputs=raw`) or RMS-normalised through a new linear layer (`rms`). On the tokens of the
default's stage 2 (2,000 steps; always "yes" 0.654): last 0.917 (two-shape clips 0.881) raw,
so the tokens' large norm is not in the way; std 0.651 at step 1,000 and 0.756 at 2,000
(two-shape 0.648), the same plateau as above; std on two-shape clips only 0.767 at 1,000 and
0.943 at 2,000. The check needs several thousand answers before it starts, which is what the
demo's stage 3a gives the whole model (docs/changelog.md, 2026-12-03).

  python experiments/binding.py --fmt=prev --steps=2000
  python experiments/binding.py --tokens_from=runs/demo --stage=stage2 --inputs=raw --fmt=std
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import sys

if __package__ in (None, ''):      # run as a script: the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np
import optax

from panda_jax.config import MODEL_SIZES
from panda_jax.data import synthetic
from panda_jax.models.llama import Llama, LlamaConfig

COLOURS, KINDS, FRAMES, CELLS = 6, 4, 4, 16
# Vocabulary: 0 pad, 1 BOS, 2-7 template words, 8 yes, 9 no, then colours, then kinds.
IS, THE, VISIBLE, START, QMARK, ASSISTANT, YES, NO = 2, 3, 4, 5, 6, 7, 8, 9
VOCAB = 10 + COLOURS + KINDS
COLOUR0, KIND0 = 10, 10 + COLOURS


def question(fmt: str, colour: int, kind: int, colours: int = COLOURS) -> list[int]:
  """The question's token ids in layout `fmt`; the answer is predicted at its last token.
  `colours`: how many colour words the vocabulary has (the kind words follow them)."""
  c, k = COLOUR0 + colour, COLOUR0 + colours + kind
  if fmt == 'std':
    return [IS, THE, c, k, VISIBLE, START, QMARK, ASSISTANT]
  if fmt == 'prev':
    return [IS, THE, VISIBLE, START, QMARK, ASSISTANT, c, k]
  if fmt == 'last':
    return [IS, THE, VISIBLE, START, QMARK, ASSISTANT, k, c]
  raise ValueError(f'fmt={fmt!r}; expected std, prev or last')


def make_batch(rng: np.random.Generator, n: int, fmts: Sequence[str], two: float = 0.5):
  """n samples: visual int [n, F*CELLS, 3] (colour+1, kind+1 or 0 for background; cell),
  text int [n, 9] (question + answer), target int [n, 9] (the answer where learned, else 0)."""
  vis = np.zeros((n, FRAMES * CELLS, 3), np.int32)
  txt = np.zeros((n, 9), np.int32)
  tgt = np.zeros((n, 9), np.int32)
  for i in range(n):
    k = 2 if rng.random() < two else 1
    cols = rng.choice(COLOURS, k, replace=False)
    kinds = rng.integers(KINDS, size=k)
    cells = np.full((FRAMES, CELLS, 2), -1)
    for s in range(k):                     # shape s enters on frame s and moves one cell a frame
      c0, step = int(rng.integers(CELLS)), int(rng.choice([-1, 1, -4, 4]))
      for f in range(s, FRAMES):
        cells[f, (c0 + step * (f - s)) % CELLS] = (cols[s], kinds[s])
    vis[i, :, 0] = cells[..., 0].reshape(-1) + 1
    vis[i, :, 1] = cells[..., 1].reshape(-1) + 1
    vis[i, :, 2] = np.tile(np.arange(CELLS), FRAMES)
    s = int(rng.integers(k))
    q = question(fmts[int(rng.integers(len(fmts)))], int(cols[s]), int(kinds[s]))
    answer = YES if s == 0 else NO
    txt[i] = q + [answer]
    tgt[i, len(q) - 1] = answer
  return vis, txt, tgt


class SymbolicPanda(nn.Module):
  """[BOS] + visual tokens + question, through the demo's decoder.

  `inputs`: 'symbolic' (vis int [B, T, 3]: colour+1, kind+1, cell, through a small MLP),
  'rms' (vis float [B, T, E]: real tokens, each RMS-normalised, then one new linear layer) or
  'raw' (real tokens as they are, as the demo's decoder receives them)."""
  cfg: LlamaConfig
  inputs: str = 'symbolic'
  colours: int = COLOURS
  kinds: int = KINDS

  @nn.compact
  def __call__(self, vis, txt):
    if self.inputs == 'symbolic':
      e = (nn.Embed(self.colours + 1, 64)(vis[..., 0]) + nn.Embed(self.kinds + 1, 64)(vis[..., 1])
           + nn.Embed(CELLS, 64)(vis[..., 2]))
      v = nn.Dense(self.cfg.hidden)(nn.gelu(nn.Dense(self.cfg.hidden)(e)))
    elif self.inputs == 'rms':
      v = vis * jax.lax.rsqrt(jnp.mean(jnp.square(vis), -1, keepdims=True) + 1e-6)
      v = nn.Dense(self.cfg.hidden)(v)
    elif self.inputs == 'raw':
      v = vis
    else:
      raise ValueError(f'inputs={self.inputs!r}; expected symbolic, rms or raw')
    llm = Llama(self.cfg, name='llm')
    bos = llm.embed(jnp.ones(txt.shape[:1] + (1,), jnp.int32))
    x = jnp.concatenate([bos, v.astype(jnp.float32), llm.embed(txt)], axis=1)
    slots = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    logits = llm(x, slots, jnp.ones(x.shape[:2], bool))['logits']
    return logits[:, 1 + vis.shape[1]:]      # [B, 9]: the prediction made at each text token


# ------------------------------------------------------------------------------------------
# The demo's own visual tokens, frozen (`--tokens_from`)

REAL_COLOURS = tuple(synthetic.COLOURS)
REAL_KINDS = tuple(synthetic.KINDS)


def real_tokens(workdir: str, stage: str = 'stage3', clips: int = 1500, batch: int = 32,
                log=print) -> dict:
  """The visual tokens the trained STAB + projector of demo workdir `workdir` (its `stage`
  checkpoint) make of its first `clips` training clips, each decoded as the demo's training
  does (`data.frames` frames at the STAB's size). Cached in
  `workdir/binding/tokens_<stage>_<clips>.npz`.

  Returns tokens float32 [N, T, E] (a clip's valid tokens in the order the decoder reads
  them), and colour, kind, appear int32 [N, 2] (the clip's shapes in order of appearance; -1
  where it has one).
  """
  cache = os.path.join(workdir, 'binding', f'tokens_{stage}_{clips}.npz')
  if os.path.exists(cache):
    with np.load(cache) as z:
      return {k: z[k] for k in z.files}
  from panda_jax.eval.videoqa import load_clip, load_model
  from panda_jax.models.panda import VideoPanda
  import ml_collections
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(workdir, 'data', 'scenes.json')) as f:
    scenes = json.load(f)
  with open(os.path.join(workdir, 'data', 'train_captions.json')) as f:
    names = [r['id'] for r in json.load(f)]           # one caption conversation per clip
  if len(names) < clips:
    raise ValueError(f'clips={clips}: {workdir} has {len(names)} training clips')
  names = names[:clips]
  cfg, variables = load_model(os.path.join(workdir, stage))
  model = VideoPanda(cfg)
  visual = jax.jit(lambda v, px, mk: model.apply(
      v, px, mk, method=lambda m, a, b: m.visual(a, b)))
  frames = int(config.data.frames)
  toks, t0 = [], time.perf_counter()
  for i in range(0, clips, batch):
    group = [load_clip(os.path.join(workdir, 'data', 'videos', n + '.mp4'), cfg.stab, frames)
             for n in names[i:i + batch]]
    px = np.stack([g['pixels'] for g in group])
    mk = np.stack([g['mask'] for g in group])
    pad = batch - len(group)                  # one compiled shape for every group
    if pad:
      px = np.concatenate([px, np.zeros((pad,) + px.shape[1:], px.dtype)])
      mk = np.concatenate([mk, np.zeros((pad,) + mk.shape[1:], mk.dtype)])
    out = visual(variables, px, mk)
    valid = np.asarray(out['valid']).reshape(batch, -1)[:len(group)]
    tok = np.asarray(out['tokens'], np.float32).reshape(batch, valid.shape[1], -1)[:len(group)]
    counts = valid.sum(1)
    if (counts != counts[0]).any():
      raise ValueError(f'clips of {workdir} have {sorted(set(counts.tolist()))} visual tokens; '
                       'the sandbox needs one count (clips of one aspect ratio)')
    toks.append(tok[valid].reshape(len(group), int(counts[0]), -1))
    log(f'tokens of {min(i + batch, clips)} / {clips} clips ({time.perf_counter() - t0:.0f} s)')
  shapes = {k: np.full((clips, 2), -1, np.int32) for k in ('colour', 'kind', 'appear')}
  for i, n in enumerate(names):
    for j, sh in enumerate(scenes[n]['shapes'][:2]):
      shapes['colour'][i, j] = REAL_COLOURS.index(sh['colour'])
      shapes['kind'][i, j] = REAL_KINDS.index(sh['kind'])
      shapes['appear'][i, j] = sh['appear']
  data = dict(tokens=np.concatenate(toks), **shapes)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  np.savez(cache, **data)
  return data


def real_batch(data: dict, clips: np.ndarray, fmts: Sequence[str],
               rng: np.random.Generator | None = None):
  """Questions about the clips `clips` of `real_tokens`' data: with `rng`, one about a random
  shape of each (a random layout of `fmts`); without, one about every shape of each (the first
  layout). -> (tokens [n, T, E], text [n, 9], target [n, 9], two-shape clip bool [n])."""
  rows = []
  for c in clips:
    k = int((data['colour'][c] >= 0).sum())
    for s in ([int(rng.integers(k))] if rng is not None else range(k)):
      fmt = fmts[int(rng.integers(len(fmts)))] if rng is not None else fmts[0]
      rows.append((int(c), s, fmt, k == 2))
  txt = np.zeros((len(rows), 9), np.int32)
  tgt = np.zeros((len(rows), 9), np.int32)
  for i, (c, s, fmt, _) in enumerate(rows):
    q = question(fmt, int(data['colour'][c, s]), int(data['kind'][c, s]), len(REAL_COLOURS))
    answer = YES if data['appear'][c, s] == 0 else NO
    txt[i] = q + [answer]
    tgt[i, len(q) - 1] = answer
  vis = data['tokens'][[r[0] for r in rows]]
  return vis, txt, tgt, np.array([r[3] for r in rows])


def run(fmt: str = 'std', eval_fmt: str = '', steps: int = 2000, batch: int = 8,
        lr: float = 2e-3, layers: int = 4, qk_norm: bool = True, seed: int = 0,
        eval_every: int = 500, eval_size: int = 512, log=print, tokens: dict | None = None,
        inputs: str = 'rms', held_out: int = 300) -> list[tuple[int, float, float, float]]:
  """Trains from scratch; returns [(step, mean train loss since last, held-out accuracy,
  held-out accuracy on two-shape clips)].

  `tokens` (from `real_tokens`): the demo's frozen visual tokens instead of symbolic ones, fed
  as `inputs` ('rms' or 'raw', see `SymbolicPanda`); the last `held_out` clips are scored,
  every shape of each, the others trained on."""
  fmts = fmt.split(',')
  for f in fmts + ([eval_fmt] if eval_fmt else []):
    question(f, 0, 0)                       # validates
  rng = np.random.default_rng(seed)
  if tokens is None:
    model_kw, vocab = {}, VOCAB
    train_batch = lambda: make_batch(rng, batch, fmts)[:3]  # noqa: E731
    evis, etxt, etgt = make_batch(np.random.default_rng(10_000 + seed), eval_size,
                                  [eval_fmt or fmts[0]])
    # The second shape of a clip is drawn on frames 1-3 only: two shapes on the last frame (a
    # clip whose shapes share that frame's cell counts as one-shape here; an approximation).
    etwo = np.array([len(set(v[-CELLS:, 0][v[-CELLS:, 0] > 0])) == 2 for v in evis])
  else:
    n = len(tokens['tokens'])
    if not 0 < held_out < n:
      raise ValueError(f'held_out={held_out} must be in (0, {n}): the clips of `tokens`')
    model_kw = dict(inputs=inputs, colours=len(REAL_COLOURS), kinds=len(REAL_KINDS))
    vocab = 10 + len(REAL_COLOURS) + len(REAL_KINDS)
    train_clips = np.arange(n - held_out)
    train_batch = lambda: real_batch(tokens, rng.choice(train_clips, batch), fmts, rng)[:3]  # noqa: E731
    evis, etxt, etgt, etwo = real_batch(tokens, np.arange(n - held_out, n),
                                        [eval_fmt or fmts[0]])
  # The demo's decoder: the tiny size's widths, with this sandbox's vocabulary.
  cfg = LlamaConfig(**dict(MODEL_SIZES['tiny']['llm'], vocab_size=vocab, layers=layers,
                           max_positions=256, qk_norm=qk_norm))
  model = SymbolicPanda(cfg, **model_kw)
  params = model.init(jax.random.PRNGKey(seed), *train_batch()[:2])
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 100), steps)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
  state = opt.init(params)

  def loss_fn(p, vis, txt, tgt):
    ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(p, vis, txt), tgt)
    w = (tgt > 0).astype(jnp.float32)
    return (ce * w).sum() / w.sum()

  @jax.jit
  def step(p, s, vis, txt, tgt):
    loss, g = jax.value_and_grad(loss_fn)(p, vis, txt, tgt)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  predict = jax.jit(lambda p, vis, txt: model.apply(p, vis, txt).argmax(-1))
  rows, losses, t0 = [], [], time.perf_counter()
  for i in range(steps):
    params, state, loss = step(params, state, *train_batch())
    losses.append(float(loss))
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      pred = np.asarray(predict(params, evis, etxt))
      at = np.argmax(etgt > 0, axis=1)       # the one learned position per sample
      right = pred[np.arange(len(at)), at] == etgt[np.arange(len(at)), at]
      two = float(right[etwo].mean()) if etwo.any() else float('nan')
      rows.append((i + 1, float(np.mean(losses)), float(right.mean()), two))
      losses = []
      log(f'step {i + 1}: loss {rows[-1][1]:.3f}, held-out accuracy {rows[-1][2]:.3f} '
          f'(two-shape clips {two:.3f}; {time.perf_counter() - t0:.0f} s)')
  return rows


def majority(eval_size: int = 512, seed: int = 0, tokens: dict | None = None,
             held_out: int = 300) -> float:
  """Accuracy of always answering yes on the held-out samples."""
  if tokens is None:
    _, _, tgt = make_batch(np.random.default_rng(10_000 + seed), eval_size, ['std'])
  else:
    n = len(tokens['tokens'])
    _, _, tgt, _ = real_batch(tokens, np.arange(n - held_out, n), ['std'])
  return float((tgt[tgt > 0] == YES).mean())


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags (defined when it runs, never at import)."""
  flags.DEFINE_string('fmt', 'std', 'Training question layout(s), comma-separated: std, prev, last.')
  flags.DEFINE_string('eval_fmt', '', 'Held-out layout (default: the first of --fmt).')
  flags.DEFINE_integer('steps', 2000, 'Training steps.')
  flags.DEFINE_integer('batch', 8, 'Batch size.')
  flags.DEFINE_float('lr', 2e-3, 'Peak learning rate (1 % warm-up, cosine).')
  flags.DEFINE_integer('layers', 4, 'Decoder layers.')
  flags.DEFINE_boolean('qk_norm', True, 'RMS-normalise queries and keys (the demo does).')
  flags.DEFINE_integer('seed', 0, 'Seed (data and initialisation).')
  flags.DEFINE_integer('eval_every', 500, 'Score the held-out samples every this many steps.')
  flags.DEFINE_string('tokens_from', '', 'A demo workdir: train on its trained STAB\'s frozen '
                      'visual tokens of its training clips instead of symbolic ones.')
  flags.DEFINE_string('stage', 'stage3', 'With --tokens_from: the stage whose STAB makes them.')
  flags.DEFINE_integer('clips', 1500, 'With --tokens_from: how many of its training clips.')
  flags.DEFINE_integer('held_out', 300, 'With --tokens_from: of those, how many are scored.')
  flags.DEFINE_enum('inputs', 'rms', ['rms', 'raw'], 'With --tokens_from: the tokens each '
                    'RMS-normalised then one new linear layer (rms), or as the demo\'s decoder '
                    'receives them (raw).')


def main(argv):
  del argv
  tokens = (real_tokens(FLAGS.tokens_from, FLAGS.stage, FLAGS.clips) if FLAGS.tokens_from
            else None)
  print(f'majority answer (yes): '
        f'{majority(seed=FLAGS.seed, tokens=tokens, held_out=FLAGS.held_out):.3f}')
  run(FLAGS.fmt, FLAGS.eval_fmt, FLAGS.steps, FLAGS.batch, FLAGS.lr, FLAGS.layers,
      FLAGS.qk_norm, FLAGS.seed, FLAGS.eval_every, tokens=tokens, inputs=FLAGS.inputs,
      held_out=FLAGS.held_out)


if __name__ == '__main__':
  define_flags()
  app.run(main)
