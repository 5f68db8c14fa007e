"""The demo's report: `report.md` and PNG figures in the workdir, every number from the run.

Figures (`figures/`): `loss.png` (cross-entropy and distillation against step, per stage),
`accuracy.png` (validation and test accuracy by question type against the majority answer),
`example.png` (one test clip's frames as the STAB sees them: padding, the crop it keeps,
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
  if share < 0.005:
    return '; the hypervisor took none of this host\'s CPU time meanwhile ("steal" in /proc/stat)'
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
  """Exact match by question type on validation and test beside the test's majority answer."""
  plt = _matplotlib()
  types = sorted(scores['test']['by_type'])
  bars = [('validation', [scores['val']['by_type'].get(t, {}).get('exact_match', 0.0)
                          for t in types], 'tab:blue'),
          ('test', [scores['test']['by_type'][t]['exact_match'] for t in types], 'tab:green'),
          ('majority answer (test)', [scores['test']['baseline'][t]['accuracy'] for t in types],
           'tab:gray')]
  x = np.arange(len(types))
  fig, ax = plt.subplots(figsize=(8, 3.6))
  for k, (label, vals, colour) in enumerate(bars):
    ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label, color=colour)
    for i, v in enumerate(vals):
      ax.text(i + (k - 1) * 0.27, v + 0.01, f'{v:.2f}', ha='center', fontsize=7)
  ax.set_xticks(x, [t.replace('_', ' ') for t in types])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('exact match')
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
    vals.append(v['scores']['exact_match'])   # `variants`' scores: one split's
    ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=v['name'])
  ax.set_xticks(x, [t.replace('_', ' ') for t in types] + ['all'])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('test exact match')
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
  """Markdown rows, validation and test side by side: per type the questions, exact match and
  the majority answer's accuracy of each, and the test's token F1 and margin."""
  val, test = scores['val'], scores['test']
  rows = ['| question type | validation: questions | exact match | majority | test: questions '
          '| exact match | majority | token F1 | margin |',
          '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for t in sorted(test['by_type']):
    v, vb = val['by_type'].get(t), val['baseline'].get(t)
    s, b = test['by_type'][t], test['baseline'][t]
    left = (f'{v["count"]} | {v["exact_match"]:.3f} | {vb["accuracy"]:.3f}' if v else '0 | | ')
    rows.append(f'| {t} | {left} | {s["count"]} | {s["exact_match"]:.3f} | '
                f'{b["accuracy"]:.3f} | {s["token_f1"]:.3f} | '
                f'{s["exact_match"] - b["accuracy"]:+.3f} |')
  margins = {k: mean_margin(scores[k]) for k in ('val', 'test')}
  rows.append(f'| **mean margin over types** | | {margins["val"]:+.3f} | | | '
              f'{margins["test"]:+.3f} | | | |')
  return rows


def mean_margin(scores: Mapping) -> float:
  """The mean over question types of exact match minus the majority answer's accuracy."""
  return float(np.mean([scores['by_type'][t]['exact_match'] - scores['baseline'][t]['accuracy']
                        for t in scores['by_type']]))


# The demo's accuracy points: direction at least DIRECTION_POINT with every direction among the
# answers, every type at least WEAK_MARGIN over its majority answer, the mean margin at least
# MEAN_MARGIN_POINT.
DIRECTION_POINT = 0.6
MEAN_MARGIN_POINT = 0.15


def accuracy_points(scores: Mapping, predictions: Sequence[Mapping]) -> dict[str, bool]:
  """Which of the demo's accuracy points one split's scores meet."""
  from panda_jax.data.synthetic import DIRECTIONS
  by_type = scores['by_type']
  answered = {_norm(r['pred']) for r in predictions if r.get('type') == 'direction'}
  return {
      f'direction >= {DIRECTION_POINT}': by_type.get('direction', {}).get(
          'exact_match', 0.0) >= DIRECTION_POINT,
      'all four directions answered': {_norm(d) for d in DIRECTIONS} <= answered,
      f'every type >= {WEAK_MARGIN} over its majority answer': all(
          by_type[t]['exact_match'] - scores['baseline'][t]['accuracy'] >= WEAK_MARGIN
          for t in by_type),
      f'mean margin >= {MEAN_MARGIN_POINT}': mean_margin(scores) >= MEAN_MARGIN_POINT,
  }


def generalisation(novel_predictions: Sequence[Mapping], novel_questions: Sequence[Mapping],
                   test: Mapping) -> list[dict]:
  """By held-out condition and question type, over the questions about a shape showing a
  condition no training clip shows: count, exact match, the majority answer's accuracy (on
  those questions) and the test split's exact match for the type."""
  from panda_jax.eval import score as score_lib
  condition = {str(q['question_id']): q['condition'] for q in novel_questions}
  groups: dict = {}
  for r in novel_predictions:
    if str(r['id']) not in condition:
      raise ValueError(f'prediction {r["id"]!r} is not one of the {len(condition)} questions '
                       'with a held-out condition')
    groups.setdefault((condition[str(r['id'])], r['type']), []).append(r)
  out = []
  for (cond, t), rows in sorted(groups.items()):
    s = score_lib.score_records(rows)
    base = score_lib.majority_baseline(rows)[t]['accuracy']
    out.append({'condition': cond, 'type': t, 'count': len(rows), 'exact_match':
                s['exact_match'], 'majority': base,
                'test': test['by_type'].get(t, {}).get('exact_match', float('nan'))})
  return out


def shape_dependence(predictions: Sequence[Mapping], questions: Sequence[Mapping]) -> dict:
  """Whether the answers depend on the shape a question names: for each question type asked
  once per shape, over the clips where it is asked about two shapes, in how many the
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
  """Writes `report.md` and the figures; returns their paths. Every sentence is derived from
  what ran: the config, the data summary, the stages' summaries and the predictions."""
  from panda_jax.data import qa as qa_lib
  from panda_jax.eval.score import read_predictions
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
  preds = {k: read_predictions(v['predictions']) for k, v in main['scores'].items()
           if isinstance(v, Mapping) and 'predictions' in v}
  clip = example_figure(config, data, preds['test'], paths['example'])
  if len(variants) > 1:
    paths['ablations'] = os.path.join(fig_dir, 'ablations.png')
    ablation_figure([dict(v, scores=v['scores']['test']) for v in variants],
                    paths['ablations'])
  questions = {k: qa_lib.load_qa(v['qa']) for k, v in data['splits'].items()}
  lines = (_what_ran(config, data, main, result) +
           _accuracy_section(main['scores'], preds) +
           _generalisation_section(data, preds, questions, main['scores']) +
           _dependence_section(preds['test'], questions['test']) +
           ['## Training', '', '![loss](figures/loss.png)', '',
            f'## One test clip ({clip})', '',
            'Each frame as the STAB receives it: the padded square (padding darkened), the '
            'rectangle of patches it keeps (yellow), its LSD grid (white; one token per cell) '
            'and the tokens the frame becomes (a context token plus each LSD row and its '
            '`<row>` token).', '', '![example](figures/example.png)', ''] +
           _ablation_section(variants) +
           ['## Files', '',
            '* `eval/<split>.jsonl`: every answer of each split (VideoQA format with `type`); '
            '`scores.json`: the scores and baselines above.',
            '* `stageN/`: checkpoints, `metrics.jsonl`, TensorBoard events, `summary.json`.',
            '* `data/`: clips, annotation files, `scenes.json` (ground truth and split of '
            'every clip), tokenizer.', ''])
  with open(paths['report'], 'w') as f:
    f.write('\n'.join(lines))
  return paths


def _what_ran(config, data: Mapping, main: Mapping, result: Mapping) -> list[str]:
  m, d = config.model, data
  # configs/demo.py:smollm2: the LLM starts from SmolLM2-135M-Instruct (data['llm_converted']).
  pretrained = d.get('llm_converted', '')
  splits = d['splits']
  stage_secs = sum(main['stages'][s]['seconds'] for s in main['stages'])
  total = d['seconds'] + stage_secs + main['scores']['seconds']
  held = d.get('held_out')
  held_text = ('; no training, validation or test clip shows the held-out conditions '
               + ', '.join([f'{c} {k}' for c, k in held['pairs']] +
                           [f'a {k} moving {x}' for k, x in held['motions']])
               if held else '')
  lines = [
      '# Video-Panda demo report', '',
      ('A Video-Panda on the pretrained SmolLM2-135M-Instruct (its tokenizer and ChatML '
       'template; the tiny STAB, projector and distillation head from scratch) trained'
       if pretrained else 'A tiny Video-Panda trained from scratch') +
      ' on synthetic clips of moving shapes through '
      f'stages {" -> ".join(str(s) for s in main["stages"])} with the project\'s training '
      'loop, then asked every question of the validation, test and held-out-condition splits '
      'with `panda_jax.eval.videoqa`. Every number below was computed by the run that wrote '
      'this file.', '',
      '## What ran', '',
      f'* Seed {d.get("seed", config.seed)} (clips, initialisation and batch order).',
      f'* Data: {d["train_clips"]} training clips; '
      + '; '.join(f'{_SPLIT_NAMES[k]} {splits[k]["clips"]} clips, {splits[k]["questions"]} '
                  f'questions ({_counts(splits[k]["by_type"])})'
                  for k in _SPLIT_NAMES if k in splits)
      + f' ({config.data.width}x{config.data.height} px, {config.data.frames} frames, up to '
      f'{config.data.max_shapes} shapes{held_text}); '
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
  count = sum(v['count'] for k, v in main['scores'].items() if isinstance(v, Mapping))
  lines += [
      f'* Evaluation: {count} answers, greedy, at most {config.eval.max_new_tokens} new tokens; '
      f'{_minutes(main["scores"]["seconds"])} in the run that made them.',
      f'* Total of the phases above: {_minutes(total)} (this invocation: '
      f'{_minutes(result["seconds_this_run"])}{_steal(result.get("steal_share"))}).', '']
  return lines


_SPLIT_NAMES = {'val': 'validation', 'test': 'test', 'novel': 'held-out conditions'}


def _counts(by_type: Mapping[str, int]) -> str:
  return ', '.join(f'{t} {n}' for t, n in sorted(by_type.items()))


def _accuracy_section(scores: Mapping, preds: Mapping) -> list[str]:
  lines = ['## Accuracy: validation and test', '',
           'Normalised exact match (case, punctuation, articles, number words) by question type, '
           'against always giving the type\'s most frequent answer in that split. Choices are '
           'made on validation; test is for this report.', '',
           *accuracy_table(scores), '']
  for split in ('val', 'test'):
    direction = scores[split]['by_type'].get('direction', {})
    given = sorted({_norm(r['pred']) for r in preds[split] if r.get('type') == 'direction'})
    points = accuracy_points(scores[split], preds[split])
    missed = [k for k, ok in points.items() if not ok]
    weak = [t for t, v in sorted(scores[split]['by_type'].items())
            if v['exact_match'] - scores[split]['baseline'][t]['accuracy'] < WEAK_MARGIN]
    lines += [f'{_SPLIT_NAMES[split].capitalize()}: motion direction '
              f'{direction.get("exact_match", float("nan")):.3f} (chance 0.25), answers given: '
              f'{", ".join(given)}. Accuracy points: '
              + ('all met.' if not missed else f'not met: {"; ".join(missed)}.')
              + (f' Less than {WEAK_MARGIN:.2f} over the majority answer: {", ".join(weak)}.'
                 if weak else ''), '']
  return lines + ['![accuracy](figures/accuracy.png)', '']


def _generalisation_section(data: Mapping, preds: Mapping, questions: Mapping,
                            scores: Mapping) -> list[str]:
  if 'novel' not in preds:
    return []
  rows = generalisation(preds['novel'], questions['novel'], scores['test'])
  return ['## Held-out conditions', '',
          'Questions about a shape showing a condition no training clip shows (a colour-kind '
          'pair never drawn together, or a kind never moving in a direction), by condition '
          'and type, beside the test split\'s exact match for the type:', '',
          '| condition | question type | questions | exact match | majority | test |',
          '|---|---|---:|---:|---:|---:|',
          *[f'| {r["condition"]} | {r["type"]} | {r["count"]} | {r["exact_match"]:.3f} | '
            f'{r["majority"]:.3f} | {r["test"]:.3f} |' for r in rows], '']


def _dependence_section(preds: Sequence[Mapping], questions: Sequence[Mapping]) -> list[str]:
  dependence = shape_dependence(preds, questions)
  return ['## Does the answer depend on the shape asked?', '',
          'On test clips of two shapes, each question type that is asked about every shape: in '
          'how many clips the model gives both shapes the same answer, against the truth. A '
          'model that finds the named shape in the video is near the truth; one that answers '
          'from the clip alone, whatever shape is named, is near the number of clips.', '',
          '| question type | clips asked about two shapes | same answer for both: model | '
          'same answer for both: truth |', '|---|---:|---:|---:|',
          *[f'| {t} | {v["clips"]} | {v["same_pred"]} | {v["same_truth"]} |'
            for t, v in dependence.items() if v['clips']], '']


def _ablation_section(variants: Sequence[Mapping]) -> list[str]:
  if len(variants) <= 1:
    return []
  types = sorted(variants[0]['scores']['test']['by_type'])
  lines = ['## Ablations', '',
           'The same data, steps and seeds; only the named model switch differs. Test exact '
           'match by type; the last column is the validation mean margin.', '',
           '| variant | switches | ' + ' | '.join(types) + ' | all | validation margin |',
           '|---|---|' + '---:|' * (len(types) + 2)]
  for v in variants:
    sw = ', '.join(f'`{k}={v2}`' for k, v2 in v['overrides'].items()) or 'released model'
    test = v['scores']['test']
    vals = [test['by_type'].get(t, {}).get('exact_match', float('nan')) for t in types]
    lines.append(f'| {v["name"]} | {sw} | ' + ' | '.join(f'{x:.3f}' for x in vals) +
                 f' | {test["exact_match"]:.3f} | {mean_margin(v["scores"]["val"]):+.3f} |')
  return lines + ['', '![ablations](figures/ablations.png)', '']
