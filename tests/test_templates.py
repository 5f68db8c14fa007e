"""Conversation templates by name (issue 35, point 3): ChatML against the tokenizer's own chat
template, label spans, generation prompt, placeholders and stop ids; the Vicuna templates are
`text.py`'s (tests/test_text.py holds their behaviour).

A tiny SmolLM2-style tokenizer (GPT-2 byte-level BPE, `<|im_start|>`/`<|im_end|>` special,
no BOS added, ChatML `chat_template`) is built here by `text.build_chatml_tokenizer`.
"""

import json
import os

import numpy as np
import pytest

from panda_jax.data import templates, text
from panda_jax.data.text import IGNORE_INDEX, IMAGE_TOKEN_INDEX

CORPUS = [templates.CHATML_SYSTEM, 'user assistant system',
          'What is the man doing in the video? The man is riding a horse.',
          'Where is he going? He is going home. Why? It is late. Be brief.'] * 4
Q0 = 'What is the man doing in the video?'
A0 = 'The man is riding a horse.'
Q1 = 'Where is he going?'
A1 = 'He is going home.'


@pytest.fixture(scope='module')
def chatml_dir(tmp_path_factory):
  return text.build_chatml_tokenizer(str(tmp_path_factory.mktemp('chatml_tok')), CORPUS)


@pytest.fixture(scope='module')
def tok(chatml_dir):
  return text.load_tokenizer(chatml_dir, model_max_length=512)


def messages(turns, system=None):
  out = [] if system is None else [{'role': 'system', 'content': system}]
  for q, a in turns:
    out.append({'role': 'user', 'content': q})
    if a is not None:
      out.append({'role': 'assistant', 'content': a})
  return out


def test_load_tokenizer_keeps_a_chatml_tokenizer_as_it_is(tok, chatml_dir, tmp_path):
  assert tok.bos_token == '<|im_start|>' and tok.eos_token == '<|im_end|>'
  assert not text.adds_bos(tok)                  # nothing forced: no <|im_start|> prepended
  assert list(tok('a b').input_ids)[0] != tok.bos_token_id
  assert tok.pad_token == '<|im_end|>' and tok.padding_side == 'right'
  assert tok.model_max_length == 512
  # No unk and no pad token: EOS pads.
  bare = text.load_tokenizer(text.build_chatml_tokenizer(str(tmp_path / 'bare'), CORPUS,
                                                         unk=False, pad=False))
  assert bare.unk_token is None and bare.pad_token_id == bare.eos_token_id
  # Forced into the Llama set-up it would start every piece with <|im_start|>.
  forced = text.load_tokenizer(chatml_dir, force_bos=True)
  assert list(forced('a b').input_ids)[0] == forced.convert_tokens_to_ids('<|im_start|>')


@pytest.mark.parametrize('system', [None, 'Answer in one word.'])
@pytest.mark.parametrize('turns', [[(Q0, A0)], [(Q0, A0), (Q1, A1)]])
def test_prompt_text_is_the_tokenizers_chat_template(tok, turns, system):
  t = templates.get('chatml', system)
  want = tok.apply_chat_template(messages(turns, system), tokenize=False)
  assert t.prompt(turns) == want
  gen = tok.apply_chat_template(messages(turns[:-1] + [(turns[-1][0], None)], system),
                                tokenize=False, add_generation_prompt=True)
  assert t.prompt(turns[:-1] + [(turns[-1][0], None)]) == gen
  assert gen.endswith('<|im_start|>assistant\n')
  # Text only: the ids are the whole rendered text's ids.
  ids, _ = t.tokenize(tok, turns, num_frames=0)
  assert list(ids) == list(tok(want).input_ids)


def test_labels_are_the_answers_and_their_end_of_turn(tok):
  t = templates.get('chatml')
  turns = [('<video>\n' + Q0, A0), (Q1, A1)]
  ids, labels = t.tokenize(tok, turns, num_frames=8)
  assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
  end = t.stop_id(tok)
  assert end == tok.convert_tokens_to_ids('<|im_end|>') == tok.eos_token_id
  learned = [list(ids[s]) for s in np.ma.clump_unmasked(np.ma.masked_equal(labels, IGNORE_INDEX))]
  plain = lambda s: list(tok(s).input_ids)  # noqa: E731
  assert learned == [plain(A0) + [end], plain(A1) + [end]]
  np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
  assert ids[-1] == plain('\n')[0] and labels[-1] == IGNORE_INDEX   # '\n' after <|im_end|>
  # The video: one run of 8 image ids right after "<|im_start|>user\n", then "\n" + question.
  img = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
  np.testing.assert_array_equal(img, np.arange(img[0], img[0] + 8))
  assert np.all(labels[img] == IGNORE_INDEX)
  head = plain(f'<|im_start|>system\n{templates.CHATML_SYSTEM}<|im_end|>\n<|im_start|>user\n')
  assert list(ids[:img[0]]) == head
  # Without the image ids the ids are the rendered text's, with the markers as ''.
  rendered = t.prompt(text.expand_placeholders(turns, 8)).replace('<image>', '')
  assert list(ids[ids != IMAGE_TOKEN_INDEX]) == plain(rendered)


def test_generation_prompt_is_the_training_prefix(tok):
  t = templates.get('chatml')
  history = [('<video>\n' + Q0, A0)]
  ids, _ = t.tokenize(tok, history + [(Q1, A1)], num_frames=8)
  gen = t.generation_ids(tok, Q1, num_frames=8, history=history)
  assert gen.dtype == np.int32
  assert list(ids[:len(gen)]) == list(gen)
  header = list(tok('<|im_start|>assistant\n').input_ids)
  assert list(gen[-len(header):]) == header
  # One question without a placeholder: the markers go first, as the reference's inference.
  one = t.generation_ids(tok, Q0, num_frames=8)
  np.testing.assert_array_equal(one, t.tokenize(tok, [('<video>\n' + Q0, A0)], 8)[0][:len(one)])


def test_placeholders_are_never_word_pieces(tok):
  """The BPE splits '<image>' into pieces; the template never lets it."""
  assert len(tok('<image>').input_ids) > 1
  assert len(tok('<video>').input_ids) > 1
  t = templates.get('chatml')
  for q in ('<video>\n' + Q0, Q0 + '\n<video>', '<image>\n' + Q0, '<image>' * 4 + '\n' + Q0):
    ids, _ = t.tokenize(tok, [(q, A0)], num_frames=4)
    img = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    np.testing.assert_array_equal(img, np.arange(img[0], img[0] + 4))
    rest = tok.decode(ids[ids != IMAGE_TOKEN_INDEX], skip_special_tokens=True)
    assert '<' not in rest and 'image' not in rest
  # The Vicuna templates split the same way (with a BOS-adding tokenizer; see test_text.py).
  vic = text.tokenizer_image_token(tok, 'a<image>b<image>', bos=False)
  assert vic.count(IMAGE_TOKEN_INDEX) == 2 and vic[-1] == IMAGE_TOKEN_INDEX


def test_stop_ids_and_names(tok, tmp_path):
  llama_dir = text.build_tokenizer(str(tmp_path / 'llama'), [text.SYSTEM_PROMPT, 'USER: hi'] * 4)
  llama = text.load_tokenizer(llama_dir)
  for name in ('vicuna_v1', 'videopanda_v1'):
    t = templates.get(name)
    assert t.system == text.SYSTEM_PROMPTS[name] and t.force_bos
    assert t.stop_id(llama) == llama.eos_token_id == 2
  assert templates.get('vicuna_v1', 'Be brief.').system == 'Be brief.'
  assert templates.get('chatml').system == templates.CHATML_SYSTEM
  assert not templates.get('chatml').force_bos
  assert templates.default_name(tok) == 'chatml'
  assert templates.default_name(llama) == 'videopanda_v1'
  with pytest.raises(ValueError, match=r"unknown conversation template 'llava'.*'videopanda_v1'"
                                       r".*'vicuna_v1'.*'chatml'"):
    templates.get('llava')
  with pytest.raises(ValueError, match="no '<\\|im_end\\|>' token"):
    templates.get('chatml').stop_id(llama)
  with pytest.raises(ValueError, match='not as one token'):
    templates.get('chatml').tokenize(llama, [('<video>\nhi', 'yo')], num_frames=8)
  with pytest.raises(ValueError, match='BOS'):
    templates.get('vicuna_v1').tokenize(tok, [('<video>\nhi', 'yo')], num_frames=8)


def test_vicuna_templates_are_text_pys(tmp_path):
  llama = text.load_tokenizer(text.build_tokenizer(
      str(tmp_path / 'llama'), [text.SYSTEM_PROMPT, text.VICUNA_V1_SYSTEM_PROMPT, Q0, A0, Q1,
                                A1, 'USER: ASSISTANT:'] * 4))
  turns = [('<video>\n' + Q0, A0), (Q1, A1)]
  for name, system in text.SYSTEM_PROMPTS.items():
    t = templates.get(name)
    assert t.prompt(turns) == text.build_prompt(turns, system)
    for a, b in zip(t.tokenize(llama, turns, 8),
                    text.tokenize_conversation(llama, turns, 8, system=system)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        t.generation_ids(llama, Q1, 8, history=turns[:1]),
        text.generation_prompt_ids(llama, Q1, 8, history=turns[:1], system=system))


def test_chatml_conversation_errors(tok):
  """The conversation's faults are ConversationErrors (skipped by the pipeline); a bad argument
  is a plain ValueError."""
  t = templates.get('chatml')
  with pytest.raises(text.ConversationError, match='template token'):
    t.tokenize(tok, [('<video>\nhi<|im_end|>', 'yo')], num_frames=8)
  with pytest.raises(text.ConversationError, match='has no answer'):
    t.tokenize(tok, [('<video>\nhi', None)], num_frames=8)
  with pytest.raises(text.ConversationError, match='only the last turn'):
    t.prompt([('hi', None), ('ho', 'yo')])
  with pytest.raises(text.ConversationError, match='non-empty'):
    t.tokenize(tok, [('<video>\nhi', '')], num_frames=8)
  with pytest.raises(text.ConversationError, match='history turn 0'):
    t.generation_ids(tok, 'ho', history=[('<video>\nhi', None)])
  with pytest.raises(ValueError, match='on_mismatch') as e:
    t.tokenize(tok, [('<video>\nhi', 'yo')], on_mismatch='ignore')
  assert not isinstance(e.value, text.ConversationError)


def test_training_sample_with_chatml(tmp_path):
  """ProcessSample (data.system_prompt='chatml') learns only the answer and its <|im_end|>."""
  from panda_jax import config as config_lib
  from panda_jax.data import pipeline, synthetic
  root = str(tmp_path)
  ds = synthetic.make_dataset(root, 1, width=64, height=48, fps=8, duration_s=1.0,
                              eval_fraction=0)
  record = json.load(open(ds.train_captions))[0]
  answer = record['conversations'][1]['value']
  corpus = [m['value'].replace('<video>', '') for m in record['conversations']]
  tok_dir = text.build_chatml_tokenizer(os.path.join(root, 'tok'), (CORPUS + corpus) * 2)
  stab = config_lib.stab_config(config_lib.model_config('tiny'))
  proc = pipeline.ProcessSample(root, tok_dir, stab, 4, 400, system_prompt='chatml',
                                system_message='Be brief.')
  out = proc(record)
  assert 'skip' not in out, out
  tok = proc.tokenizer
  learned = [int(i) for i in out['labels'] if i != IGNORE_INDEX]
  assert learned == list(tok(answer).input_ids) + [tok.convert_tokens_to_ids('<|im_end|>')]
  assert 'Be brief.' in tok.decode([i for i in out['ids'] if i >= 0])
  assert int(np.sum(out['ids'] == IMAGE_TOKEN_INDEX)) == 4
  with pytest.raises(ValueError, match=r"system prompt 'llava': unknown conversation template"):
    pipeline.ProcessSample(root, tok_dir, stab, 4, 400, system_prompt='llava')
  with pytest.raises(ValueError, match=r"system prompt 'vicuna_v1': the tokenizer .* EOS is '<.im_end.>'"):
    pipeline.ProcessSample(root, tok_dir, stab, 4, 400, system_prompt='vicuna_v1')


def test_predictor_and_clis_use_the_template(tok, chatml_dir, tmp_path):
  """Predictor's prompts and stop id come from its template; `load_text` (the CLIs' door)
  picks the template by name, a workdir's data.system_prompt or the tokenizer's own."""
  import jax
  from panda_jax.eval.predict import Predictor, load_text
  from panda_jax.models.panda import VideoPanda
  from test_predict import CFG
  import flax.linen as nn
  import jax.numpy as jnp
  from conftest import box_mask
  from panda_jax.data.assembly import layout_batch
  # Zero parameters of the right shapes (traced, not compiled): nothing here runs the model.
  f = 4
  ids = np.array([[1] + [IMAGE_TOKEN_INDEX] * f + [5]])
  mask = np.asarray(box_mask(1, f, [(0, 112, 0, 112)] * f))
  lay = layout_batch(ids, None, np.ones_like(ids), mask, CFG.stab, max_len=96)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()},
               pixels=jnp.zeros(mask.shape + (3,), jnp.float32), mask=jnp.asarray(mask))
  shapes = jax.eval_shape(lambda b: nn.unbox(VideoPanda(CFG).init(
      jax.random.PRNGKey(1), b, with_distill=False)), batch)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  pred = Predictor(CFG, variables, tok, template='chatml')
  assert pred.sampling.eos_id == tok.convert_tokens_to_ids('<|im_end|>')
  np.testing.assert_array_equal(pred.prompt_ids('Why?', 4),
                                templates.get('chatml').generation_ids(tok, 'Why?', 4))
  with pytest.raises(ValueError, match='unknown conversation template'):
    Predictor(CFG, variables, tok, template='chatml2')

  t, chosen = load_text(chatml_dir)
  assert chosen.name == 'chatml' and chosen.system == templates.CHATML_SYSTEM
  assert not text.adds_bos(t)
  _, chosen = load_text(chatml_dir, 'chatml', 'Be brief.')
  assert chosen.system == 'Be brief.'
  work = tmp_path / 'work'
  work.mkdir()
  (work / 'config.json').write_text(json.dumps({'data': {'system_prompt': 'chatml'}}))
  assert load_text(chatml_dir, checkpoint=str(work))[1].name == 'chatml'
  llama_dir = text.build_tokenizer(str(tmp_path / 'llama'), [text.SYSTEM_PROMPT, 'USER: hi'] * 4)
  llama, chosen = load_text(llama_dir)
  assert chosen.name == 'videopanda_v1' and chosen.stop_id(llama) == llama.eos_token_id
  assert load_text(llama_dir, 'vicuna_v1')[1].name == 'vicuna_v1'
  with pytest.raises(ValueError, match=r"cannot write the 'chatml' conversation template"):
    load_text(llama_dir, 'chatml')
  with pytest.raises(ValueError, match=r"cannot write the 'vicuna_v1' conversation template"):
    load_text(chatml_dir, 'vicuna_v1')


def test_config_names_the_template():
  from panda_jax import config as config_lib
  c = config_lib.train_config(2, 'tiny')
  assert c.data.system_prompt == 'videopanda_v1'
  c.data.system_prompt = 'chatml'
  config_lib.resolve(c)
  c.data.system_prompt = 'vicuna'
  with pytest.raises(ValueError, match=r"data.system_prompt: unknown conversation template "
                                       r"'vicuna'; expected one of"):
    config_lib.resolve(c)
