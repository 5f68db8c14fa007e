"""The demo's report: `report.md` and PNG figures in the workdir, every number from the run.

Figures (`figures/`): `loss.png` (cross-entropy and distillation against step, per stage),
`accuracy.png` (held-out accuracy by question type against the majority-answer baseline),
`example.png` (one held-out clip's frames as the STAB sees them: padding, the crop it keeps,
its LSD grid and tokens per frame, with the model's answers beside the truth) and, with
ablations, `ablations.png`.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np


# A question type is reported as not learned when its exact match is less than this over
# its majority answer.
WEAK_MARGIN = 0.05


def _steal(share) -> str:
  if share is None:
    return ''
  return (f'; the hypervisor gave {100 * share:.0f} % of this host\'s CPU time to other '
          'machines meanwhile ("steal" in /proc/stat): on a host of its own, the run keeping '
          f'its cores busy, the same work would take about {100 * (1 - share):.0f} % of these '
          'minutes')


def _matplotlib():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def read_metrics(stage_dir: str) -> list[dict]:
  """The logged scalars of a stage (`metrics.jsonl`), the last record of each step kept (a
  resumed run may log a step twice)."""
  path = os.path.join(stage_dir, 'metrics.jsonl')
  by_step: dict = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        by_step[int(row['step'])] = row
  return [by_step[k] for k in sorted(by_step)]


def loss_figure(variant_dir: str, path: str, phases: Sequence[str]) -> None:
  """Cross-entropy and distillation loss against the step, one panel for each of the variant's
  training `phases` (`demo.run.phases`: '1', '2', '3a' when stage 3 has a focus phase, '3')."""
  plt = _matplotlib()
  stages = [str(s) for s in phases]
  fig, axes = plt.subplots(1, len(stages), figsize=(4.4 * len(stages), 3.6), sharey=False)
  for ax, s in zip(axes, stages):
    rows = read_metrics(os.path.join(variant_dir, f'stage{s}'))
    steps = [r['step'] for r in rows]
    ax.plot(steps, [r['ce'] for r in rows], label='cross-entropy', color='tab:blue')
    ax.plot(steps, [r['distill'] for r in rows], label='distillation (1 - cos)',
            color='tab:orange')
    ax.set_title(f'stage {s}' + {'1': ' (visual + head only)', '3a': ' (focus questions)'}.get(
        s, ''))
    ax.set_xlabel('step')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('loss')
  axes[0].legend(loc='upper right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def accuracy_figure(scores: Mapping, path: str) -> None:
  """Held-out exact-match accuracy by question type beside the majority-answer baseline."""
  plt = _matplotlib()
  types = sorted(scores['by_type'])
  acc = [scores['by_type'][t]['exact_match'] for t in types]
  base = [scores['baseline'][t]['accuracy'] for t in types]
  x = np.arange(len(types))
  fig, ax = plt.subplots(figsize=(7, 3.6))
  ax.bar(x - 0.2, acc, 0.4, label='model', color='tab:green')
  ax.bar(x + 0.2, base, 0.4, label='majority answer', color='tab:gray')
  for i, (a, b) in enumerate(zip(acc, base)):
    ax.text(i - 0.2, a + 0.01, f'{a:.2f}', ha='center', fontsize=8)
    ax.text(i + 0.2, b + 0.01, f'{b:.2f}', ha='center', fontsize=8)
  ax.set_xticks(x, [t.replace('_', ' ') for t in types])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('held-out exact match')
  ax.legend(fontsize=8)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def ablation_figure(variants: Sequence[Mapping], path: str) -> None:
  """Held-out accuracy by type for every variant (one group of bars per type)."""
  plt = _matplotlib()
  types = sorted(variants[0]['scores']['by_type'])
  x = np.arange(len(types) + 1)
  width = 0.8 / len(variants)
  fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(types) + 2), 3.8))
  for i, v in enumerate(variants):
    vals = [v['scores']['by_type'].get(t, {}).get('exact_match', 0.0) for t in types]
    vals.append(v['scores']['exact_match'])
    ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=v['name'])
  ax.set_xticks(x, [t.replace('_', ' ') for t in types] + ['all'])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('held-out exact match')
  ax.legend(fontsize=7, ncol=2)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def example_figure(config, data: Mapping, predictions: Sequence[Mapping], path: str,
                   video_name: str | None = None) -> str:
  """One held-out clip: each frame as the STAB receives it (padded square), the rectangle of
  patches it keeps, its LSD grid and token count, and the model's answers beside the truth.
  Returns the clip's name."""
  from panda_jax.data.video import load_video
  from panda_jax.models.stab import frame_grid, frame_layout
  plt = _matplotlib()
  from panda_jax import config as config_lib
  cfg = config_lib.stab_config(config.model)
  by_video: dict = {}
  for r in predictions:
    by_video.setdefault(r['id'].rsplit('_', 1)[0], []).append(r)
  if not by_video:
    raise ValueError('no predictions to show')
  if video_name is None:   # the clip with the most questions (ties: the first by name)
    video_name = sorted(by_video, key=lambda k: (-len(by_video[k]), k))[0]
  v = load_video(os.path.join(data['videos'], video_name + '.mp4'), num=config.data.frames,
                 size=cfg.image_size, teacher_size=cfg.image_size // 2, patch=cfg.patch_size)
  pixels, mask = v['pixels'], v['mask']            # [F, S, S, 3] normalised, [F, S, S]
  hw, origin = frame_grid(mask[None], cfg, xp=np)
  lengths = frame_layout(hw, cfg.lsd_grid, xp=np, row_token=cfg.row_token)['length'][0]
  mean = np.asarray([0.48145466, 0.4578275, 0.40821073])
  std = np.asarray([0.26862954, 0.26130258, 0.27577711])
  rgb = np.clip(pixels * std + mean, 0, 1)
  f = rgb.shape[0]
  cell = cfg.token_stride * cfg.patch_size        # pixels per token side (LSD: 2 patches)
  fig = plt.figure(figsize=(3.0 * f, 5.4))
  for k in range(f):
    ax = fig.add_subplot(2, f, k + 1)
    ax.imshow(rgb[k])
    ax.imshow(np.where(mask[k][..., None] > 0, 0.0, 0.55) * np.ones((1, 1, 4)) *
              np.asarray([0, 0, 0, 1.0]), interpolation='nearest')
    h, w = (int(a) for a in hw[0, k])
    r0, c0 = (int(a) * cell for a in origin[0, k])
    for i in range(h + 1):
      ax.plot([c0, c0 + w * cell], [r0 + i * cell] * 2, color='white', lw=0.6)
    for j in range(w + 1):
      ax.plot([c0 + j * cell] * 2, [r0, r0 + h * cell], color='white', lw=0.6)
    ax.add_patch(plt.Rectangle((c0, r0), w * cell, h * cell, fill=False, color='yellow',
                               lw=1.5))
    rows = f'({w} + 1)' if cfg.row_token else f'{w}'
    ax.set_title(f'frame {k}: token grid {h}x{w}\n1 + {h} x {rows} = {int(lengths[k])} tokens',
                 fontsize=8)
    ax.axis('off')
  ax = fig.add_subplot(2, 1, 2)
  ax.axis('off')
  lines = [f'{video_name}: questions, truth and the model\'s answer']
  for r in sorted(by_video[video_name], key=lambda r: r['id']):
    q = r['question'].split('\n')[0]
    ok = 'OK ' if _norm(r['pred']) == _norm(r['answer']) else 'NO '
    lines.append(f'{ok} {q}   truth: {r["answer"]}   model: {r["pred"]}')
  ax.text(0.0, 1.0, '\n'.join(lines), va='top', ha='left', fontsize=8, family='monospace',
          transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return video_name


def _norm(s: str) -> str:
  from panda_jax.eval.score import normalize_answer
  return normalize_answer(s)


def accuracy_table(scores: Mapping) -> list[str]:
  """Markdown rows: type, questions, exact match, token F1, majority answer and its accuracy,
  margin over it."""
  rows = ['| question type | questions | exact match | token F1 | majority answer | '
          'majority accuracy | margin |', '|---|---:|---:|---:|---|---:|---:|']
  for t in sorted(scores['by_type']):
    s, b = scores['by_type'][t], scores['baseline'][t]
    rows.append(f'| {t} | {s["count"]} | {s["exact_match"]:.3f} | {s["token_f1"]:.3f} | '
                f'{b["answer"]} | {b["accuracy"]:.3f} | {s["exact_match"] - b["accuracy"]:+.3f} |')
  mean_acc = float(np.mean([scores['by_type'][t]['exact_match'] for t in scores['by_type']]))
  mean_base = float(np.mean([scores['baseline'][t]['accuracy'] for t in scores['by_type']]))
  rows.append(f'| **mean over types** | {scores["count"]} | {mean_acc:.3f} | | | '
              f'{mean_base:.3f} | {mean_acc - mean_base:+.3f} |')
  return rows


def shape_dependence(predictions: Sequence[Mapping], questions: Sequence[Mapping]) -> dict:
  """Whether the answers depend on the shape a question names: for each question type asked
  once per shape, over the held-out clips where it is asked about two shapes, in how many the
  model gives both the same answer (`same_pred`) against how many the truth does
  (`same_truth`), answers normalised as the scorer does. A model that reads the named shape in
  the clip is near the truth; one that answers from the clip alone is near `clips`.
  `questions`: the VideoQA question records (`question_id`, `video_name`)."""
  from panda_jax.data.synthetic import PER_SHAPE_TYPES
  video = {str(q['question_id']): q['video_name'] for q in questions}
  groups: dict = {}
  for r in predictions:
    if r.get('type') in PER_SHAPE_TYPES:
      if str(r['id']) not in video:
        raise ValueError(f'prediction {r["id"]!r} is not one of the {len(video)} questions')
      groups.setdefault((r['type'], video[str(r['id'])]), []).append(r)
  out = {}
  for t in PER_SHAPE_TYPES:
    pairs = [g for (ty, _), g in groups.items() if ty == t and len(g) == 2]
    out[t] = {'clips': len(pairs),
              'same_pred': sum(_norm(a['pred']) == _norm(b['pred']) for a, b in pairs),
              'same_truth': sum(_norm(a['answer']) == _norm(b['answer']) for a, b in pairs)}
  return out


def _minutes(s: float) -> str:
  return f'{s / 60:.1f} min'


def write_report(config, workdir: str, result: Mapping) -> dict:
  """Writes `report.md` and the figures; returns their paths."""
  fig_dir = os.path.join(workdir, 'figures')
  os.makedirs(fig_dir, exist_ok=True)
  data, variants = result['data'], result['variants']
  main = variants[0]
  paths = {'report': os.path.join(workdir, 'report.md'),
           'loss': os.path.join(fig_dir, 'loss.png'),
           'accuracy': os.path.join(fig_dir, 'accuracy.png'),
           'example': os.path.join(fig_dir, 'example.png')}
  loss_figure(workdir, paths['loss'], list(main['stages']))
  accuracy_figure(main['scores'], paths['accuracy'])
  from panda_jax.data import qa as qa_lib
  from panda_jax.eval.score import read_predictions
  preds = read_predictions(main['predictions'])
  clip = example_figure(config, data, preds, paths['example'])
  if len(variants) > 1:
    paths['ablations'] = os.path.join(fig_dir, 'ablations.png')
    ablation_figure(variants, paths['ablations'])

  direction = main['scores']['by_type'].get('direction', {})
  dir_preds = sorted({_norm(r['pred']) for r in preds if r.get('type') == 'direction'})
  m, d = config.model, data
  # configs/demo.py:smollm2: the LLM starts from SmolLM2-135M-Instruct (data['llm_converted']).
  pretrained = d.get('llm_converted', '')
  dependence = shape_dependence(preds, qa_lib.load_qa(data['eval_qa']))
  weak = [t for t, v in sorted(main['scores']['by_type'].items())
          if v['exact_match'] - main['scores']['baseline'][t]['accuracy'] < WEAK_MARGIN]
  weak_types = ([f'Not learned in this run (less than {WEAK_MARGIN:.2f} over the majority '
                 f'answer): {", ".join(weak)}.' + (
                     ' "visible at the start" is learned in stage 3a, which can end on a '
                     'plateau (README: "Stage 3a").' if 'at_start' in weak and not pretrained
                     else ''), '']
                if weak else [])
  stage_secs = sum(main['stages'][s]['seconds'] for s in main['stages'])
  total = d['seconds'] + stage_secs + main['scores']['seconds']
  lines = [
      '# Video-Panda demo report', '',
      ('A Video-Panda on the pretrained SmolLM2-135M-Instruct (its tokenizer and ChatML '
       'template; the tiny STAB, projector and distillation head from scratch) trained'
       if pretrained else 'A tiny Video-Panda trained from scratch') +
      ' on synthetic clips of moving shapes through '
      f'stages {" -> ".join(str(s) for s in main["stages"])} with the project\'s training '
      'loop, then asked every held-out '
      'question with `panda_jax.eval.videoqa`. Every number below was computed by the run that '
      'wrote this file.', '',
      '## What ran', '',
      f'* Data: {d["train_clips"]} training clips, {d["eval_clips"]} held-out clips '
      f'({config.data.width}x{config.data.height} px, {config.data.frames} frames, up to '
      f'{config.data.max_shapes} shapes), {d["eval_questions"]} held-out questions '
      f'({", ".join(f"{k} {v}" for k, v in sorted(d["eval_by_type"].items()))}); '
      f'{"SmolLM2" + chr(39) + "s " if pretrained else ""}tokenizer of '
      f'{d["tokenizer_vocab"]} tokens; {_minutes(d["seconds"])}.',
      f'* Model: STAB hidden {m.stab.hidden} at {m.stab.image_size} px, Llama {m.llm.layers} '
      f'layers x {m.llm.hidden} ({m.llm.heads} heads'
      + (', queries and keys RMS-normalised per head' if m.llm.qk_norm else '')
      + (', tied input/output embeddings' if m.llm.tie_embeddings else '')
      + f'), vocabulary {m.llm.vocab_size}'
      + (f'; the LLM is SmolLM2-135M-Instruct (converted in `{pretrained}`), which stage 1 '
         'starts from and keeps frozen' if pretrained else '') + '.',
      f'* Teacher: {config.report.teacher_note}',
  ]
  for s, st in main['stages'].items():          # in the order they ran
    what = (f' (stage 3\'s first phase: the single questions of data.focus_types '
            f'{tuple(config.data.focus_types)} alone)' if str(s) == '3a' else '')
    lines.append(f'* Stage {s}{what}: {st["step"]} steps of batch {st["batch_size"]}, lr '
                 f'{st["lr"]:g}, trains {", ".join(st["trainable"])}; final loss '
                 f'{st.get("loss", float("nan")):.3f} (ce {st.get("ce", float("nan")):.3f}, '
                 f'distill {st.get("distill", float("nan")):.3f}); {_minutes(st["seconds"])}.')
  lines += [
      f'* Evaluation: {main["scores"]["count"]} answers, greedy, at most '
      f'{config.eval.max_new_tokens} new tokens; {_minutes(main["scores"]["seconds"])} in the '
      'run that made them.',
      f'* Total of the phases above: {_minutes(total)} (this invocation: '
      f'{_minutes(result["seconds_this_run"])}{_steal(result.get("steal_share"))}).', '',
      '## Held-out accuracy', '',
      'Normalised exact match (case, punctuation, articles, number words) by question type, '
      'against always giving the type\'s most frequent answer:', '',
      *accuracy_table(main['scores']), '',
      f'Motion direction: {direction.get("exact_match", float("nan")):.3f} '
      f'(chance 0.25); answers given: {", ".join(dir_preds)}.', '',
      *weak_types, '![accuracy](figures/accuracy.png)', '',
      '## Does the answer depend on the shape asked?', '',
      'On held-out clips of two shapes, each question type that is asked about every shape: in '
      'how many clips the model gives both shapes the same answer, against the truth. A model '
      'that finds the named shape in the video is near the truth; one that answers from the '
      'clip alone, whatever shape is named, is near the number of clips (README: "Stage 3a").',
      '', '| question type | clips asked about two shapes | same answer for both: model | '
      'same answer for both: truth |', '|---|---:|---:|---:|',
      *[f'| {t} | {v["clips"]} | {v["same_pred"]} | {v["same_truth"]} |'
        for t, v in dependence.items() if v['clips']], '',
      '## Training', '', '![loss](figures/loss.png)', '',
      f'## One held-out clip ({clip})', '',
      'Each frame as the STAB receives it: the padded square (padding darkened), the rectangle '
      'of patches it keeps (yellow), its LSD grid (white; one token per cell) and the tokens '
      'the frame becomes (a context token plus each LSD row and its `<row>` token).', '',
      '![example](figures/example.png)', '']
  if len(variants) > 1:
    types = sorted(main['scores']['by_type'])
    lines += ['## Ablations', '',
              'The same data, steps and seeds; only the named model switch differs.', '',
              '| variant | switches | ' + ' | '.join(types) + ' | all |',
              '|---|---|' + '---:|' * (len(types) + 1)]
    for v in variants:
      sw = ', '.join(f'`{k}={v2}`' for k, v2 in v['overrides'].items()) or 'released model'
      vals = [v['scores']['by_type'].get(t, {}).get('exact_match', float('nan'))
              for t in types]
      lines.append(f'| {v["name"]} | {sw} | ' + ' | '.join(f'{x:.3f}' for x in vals) +
                   f' | {v["scores"]["exact_match"]:.3f} |')
    lines += ['', '![ablations](figures/ablations.png)', '']
  lines += ['## Files', '',
            '* `eval/predictions.jsonl`: every answer (VideoQA format with `type`); '
            '`scores.json`: the scores and baselines above.',
            '* `stageN/`: checkpoints, `metrics.jsonl`, TensorBoard events, `summary.json`.',
            '* `data/`: clips, annotation files, `scenes.json` (ground truth), tokenizer.', '']
  with open(paths['report'], 'w') as f:
    f.write('\n'.join(lines))
  return paths
