"""Tokenizer loading, the v1 template and label masking (spec section 4).

A tiny Llama-style tokenizer is built here: a BPE model with byte fallback (ids 3..258 are the
bytes, so '\\n' is <0x0A> = 13 as in Llama), `<unk>`=0, `<s>`=1, `</s>`=2, and the Llama-2
`tokenizer.json` pipeline (normalizer: prepend '▁', spaces -> '▁'), saved as a Hugging Face
directory with its `tokenizer_config.json` and loaded through `load_tokenizer`.
"""

import json
import os
import pathlib
import warnings

import numpy as np
import pytest

from panda_jax.data import text
from panda_jax.data.text import IGNORE_INDEX, IMAGE_TOKEN_INDEX

CORPUS = [text.SYSTEM_PROMPT, text.VICUNA_V1_SYSTEM_PROMPT,
          'USER: What is the man doing in the video? ASSISTANT: The man is riding a horse.',
          'USER: Where is he going? ASSISTANT: He is going home.', 'USER: ASSISTANT:'] * 4


def build_tokenizer_dir(dirname, **kw):
  return text.build_tokenizer(dirname, CORPUS, **kw)


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  # legacy=False in the config, as newer Llama checkpoints write it; load_tokenizer overrides.
  return build_tokenizer_dir(str(tmp_path_factory.mktemp('llama_tok')))


@pytest.fixture(scope='module')
def tok(tok_dir):
  return text.load_tokenizer(tok_dir, model_max_length=512)


def plain(tokenizer, s):
  """Token ids of `s` without the BOS."""
  ids = list(tokenizer(s).input_ids)
  assert ids[0] == tokenizer.bos_token_id
  return ids[1:]


Q0 = 'What is the man doing in the video?'
A0 = 'The man is riding a horse.'
Q1 = 'Where is he going?'
A1 = 'He is going home.'
Q2 = 'Why?'
A2 = 'It is late.'


# ---------------------------------------------------------------------------------------------
# Loading.


def test_load_tokenizer_settings(tok, tok_dir):
  assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
  assert tok.pad_token_id == 0
  assert tok.padding_side == 'right'
  assert tok.model_max_length == 512
  assert list(tok('').input_ids) == [1]
  ids = list(tok('The man is riding.').input_ids)
  assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids
  assert list(tok('\n').input_ids)[-1] == 13      # byte fallback, as Llama's <0x0A>
  assert text.load_tokenizer(tok_dir).model_max_length == 4096


def test_load_generic_fast_tokenizer_gets_bos(tmp_path):
  """A plain tokenizer.json whose post-processor adds nothing still gets BOS and no EOS."""
  d = build_tokenizer_dir(str(tmp_path / 'g'), tokenizer_class='PreTrainedTokenizerFast',
                          post_processor=False)
  t = text.load_tokenizer(d)
  assert list(t('a b').input_ids)[0] == 1 and t.pad_token_id == 0
  llama = text.load_tokenizer(build_tokenizer_dir(str(tmp_path / 'l')))
  turns = [('<video>\n' + Q0, A0), (Q1, A1)]
  for a, b in zip(text.tokenize_conversation(t, turns), text.tokenize_conversation(llama, turns)):
    np.testing.assert_array_equal(a, b)


def test_load_errors_name_the_path(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='nope'):
    text.load_tokenizer(missing)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='neither tokenizer.json nor tokenizer.model'):
    text.load_tokenizer(empty)
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'tokenizer.json').write_text('{not json')
  with pytest.raises(ValueError, match='broken'):
    text.load_tokenizer(broken)
  spm_only = tmp_path / 'spm_only'
  spm_only.mkdir()
  (spm_only / 'tokenizer.model').write_bytes(b'\x00')
  with pytest.raises(ValueError, match='spm_only'):
    text.load_tokenizer(spm_only)


def test_check_tokenizer_rejects_eos_or_missing_bos(tok_dir):
  import transformers
  t = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True,
                                                 add_bos_token=True, add_eos_token=True)
  t.pad_token = t.unk_token
  with pytest.raises(ValueError, match='appends EOS'):
    text.check_tokenizer(t)
  with pytest.raises(ValueError, match='appends EOS') as e:
    text.tokenize_conversation(t, [('<video>\n' + Q0, A0)])
  assert not isinstance(e.value, text.ConversationError)   # the tokenizer's fault, not the data's
  t = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True,
                                                 add_bos_token=False)
  t.pad_token = t.unk_token
  with pytest.raises(ValueError, match='one BOS'):
    text.check_tokenizer(t)


# ---------------------------------------------------------------------------------------------
# Template.


def test_build_prompt_strings():
  s = text.SYSTEM_PROMPT
  assert s == ('A chat between a curious human and an artificial intelligence assistant. The '
               "assistant gives helpful, detailed, and polite answers to the human's questions.")
  assert text.build_prompt([('Q', 'A')]) == s + ' USER: Q ASSISTANT: A</s>'
  assert text.build_prompt([('Q', 'A'), ('R', 'B')]) == (
      s + ' USER: Q ASSISTANT: A</s>USER: R ASSISTANT: B</s>')
  assert text.build_prompt([('Q', 'A'), ('R', None)]) == (
      s + ' USER: Q ASSISTANT: A</s>USER: R ASSISTANT:')
  assert text.build_prompt([('Q', None)], system='S') == 'S USER: Q ASSISTANT:'
  msgs = [{'from': 'human', 'value': 'Q'}, {'from': 'gpt', 'value': 'A'}]
  assert text.build_prompt(msgs) == text.build_prompt([('Q', 'A')])
  with pytest.raises(ValueError, match='only the last turn'):
    text.build_prompt([('Q', None), ('R', 'B')])
  with pytest.raises(ValueError, match='non-empty'):
    text.build_prompt([('Q', '')])
  with pytest.raises(ValueError, match='non-empty'):
    text.build_prompt([('', 'A')])
  with pytest.raises(ValueError, match='empty conversation'):
    text.build_prompt([])


def test_expand_placeholders_like_preprocess_multimodal():
  img8 = '<image>' * 8
  want = [(img8 + '\nQ', 'A')]
  assert text.expand_placeholders([('<video>\nQ', 'A')]) == want
  assert text.expand_placeholders([('Q\n<video>', 'A')]) == want         # moved to the front
  assert text.expand_placeholders([('  Q \n<video>', 'A')]) == want      # and stripped
  assert text.expand_placeholders([('<image>\nQ', 'A')]) == want
  assert text.expand_placeholders([(img8 + '\nQ', 'A')]) == want         # already expanded
  assert text.expand_placeholders([('Q\n' + img8, 'A')]) == want
  assert text.expand_placeholders([('<video>\nQ', 'A')], 4) == [('<image>' * 4 + '\nQ', 'A')]
  # Elsewhere the placeholder stays where it is (the reference moves only a trailing one).
  assert text.expand_placeholders([('Look: <video> now', 'A')]) == [(f'Look: {img8} now', 'A')]
  assert text.expand_placeholders([('Q', 'A')], 0) == [('Q', 'A')]
  assert text.expand_placeholders([('Q', None)], 2, insert_missing=True) == [
      ('<image><image>\nQ', None)]


# ---------------------------------------------------------------------------------------------
# Ids and labels.


def check_layout(tok, turns, ids, labels, num_frames=8, system=text.SYSTEM_PROMPT):
  """Independent expectation: [BOS] + tokens of the pieces + image block, answers learned."""
  assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
  assert ids[0] == tok.bos_token_id and np.sum(ids == tok.bos_token_id) == 1
  q0 = turns[0][0].replace('<video>\n', '')
  if num_frames:
    want = list(tok(system + ' USER: ').input_ids) + [IMAGE_TOKEN_INDEX] * num_frames
    want += plain(tok, '\n' + q0 + ' ASSISTANT:')
  else:
    want = list(tok(system + ' USER: ' + q0 + ' ASSISTANT:').input_ids)
  learned = []
  for k, (q, a) in enumerate(turns):
    if k:
      want += plain(tok, 'USER: ' + q + ' ASSISTANT:')
    answer = plain(tok, a) + [tok.eos_token_id]   # 'A' gets the '▁' prefix of ': A'
    learned.append((len(want), len(want) + len(answer)))
    want += answer
  np.testing.assert_array_equal(ids, want)
  want_labels = np.full(len(want), IGNORE_INDEX)
  for start, end in learned:
    want_labels[start:end] = ids[start:end]
  np.testing.assert_array_equal(labels, want_labels)
  return learned


def test_single_turn_layout(tok):
  turns = [('<video>\n' + Q0, A0)]
  ids, labels = text.tokenize_conversation(tok, turns)
  (start, end), = check_layout(tok, turns, ids, labels)
  # The image block: one run of 8, right after the "USER: " tokens, before the newline.
  where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
  np.testing.assert_array_equal(where, np.arange(where[0], where[0] + 8))
  pieces = tok.convert_ids_to_tokens([int(i) for i in ids[where[0] - 2:where[0]]])
  assert pieces == ['▁USER:', '▁']      # the Llama tokenizer keeps the space as its own '▁'
  assert tok.convert_ids_to_tokens([int(i) for i in ids[where[-1] + 1:where[-1] + 3]]) == [
      '▁', '<0x0A>']
  assert ids[where[-1] + 2] == 13
  # Learned: exactly the answer and its </s>, right after 'ASSISTANT:'.
  assert tok.decode([int(i) for i in ids[start:end]]) == A0 + '</s>'
  assert tok.convert_ids_to_tokens(int(ids[start - 1])) == '▁ASSISTANT:'
  assert np.all(labels[:start] == IGNORE_INDEX) and np.all(labels[where] == IGNORE_INDEX)


def test_multi_turn_labels(tok):
  turns = [('<video>\n' + Q0, A0), (Q1, A1), (Q2, A2)]
  ids, labels = text.tokenize_conversation(tok, turns)
  spans = check_layout(tok, turns, ids, labels)
  for (start, end), (_, a) in zip(spans, turns):
    assert tok.decode([int(i) for i in labels[start:end]]) == a + '</s>'
  assert np.sum(labels != IGNORE_INDEX) == sum(e - s for s, e in spans)
  assert np.sum(ids == tok.eos_token_id) == 3
  assert np.all(labels[ids == tok.eos_token_id] == tok.eos_token_id)


def test_data_file_messages_and_placeholder_forms_agree(tok):
  msgs = [{'from': 'human', 'value': Q0 + '\n<video>'}, {'from': 'gpt', 'value': A0},
          {'from': 'human', 'value': Q1}, {'from': 'gpt', 'value': A1}]
  want = text.tokenize_conversation(tok, [('<video>\n' + Q0, A0), (Q1, A1)])
  for conv in (msgs, [{'from': 'gpt', 'value': 'Hi.'}] + msgs,   # leading gpt dropped
               [('<image>\n' + Q0, A0), (Q1, A1)], [('<image>' * 8 + '\n' + Q0, A0), (Q1, A1)]):
    for a, b in zip(text.tokenize_conversation(tok, conv), want):
      np.testing.assert_array_equal(a, b)


def test_frames_count_and_text_only(tok):
  ids, labels = text.tokenize_conversation(tok, [('<video>\n' + Q0, A0)], num_frames=4)
  assert np.sum(ids == IMAGE_TOKEN_INDEX) == 4
  check_layout(tok, [('<video>\n' + Q0, A0)], ids, labels, num_frames=4)
  ids, labels = text.tokenize_conversation(tok, [(Q0, A0), (Q1, A1)], num_frames=0)
  assert not np.any(ids == IMAGE_TOKEN_INDEX)
  check_layout(tok, [(Q0, A0), (Q1, A1)], ids, labels, num_frames=0)


def test_other_system_prompt(tok):
  turns = [('<video>\n' + Q0, A0)]
  ids, labels = text.tokenize_conversation(tok, turns, system=text.VICUNA_V1_SYSTEM_PROMPT)
  check_layout(tok, turns, ids, labels, system=text.VICUNA_V1_SYSTEM_PROMPT)


def test_generation_prompt_is_the_training_prefix(tok):
  turns = [('<video>\n' + Q0, A0), (Q1, A1)]
  ids, labels = text.tokenize_conversation(tok, turns)
  learned = np.flatnonzero(labels != IGNORE_INDEX)
  first = learned[0]
  gen = text.generation_prompt_ids(tok, '<video>\n' + Q0)
  assert gen.dtype == np.int32
  np.testing.assert_array_equal(gen, ids[:first])
  assert tok.convert_ids_to_tokens(int(gen[-1])) == '▁ASSISTANT:'
  # Without a placeholder the frames go in front, as the reference's inference script does.
  np.testing.assert_array_equal(text.generation_prompt_ids(tok, Q0), gen)
  # Second turn: the prefix up to the second answer.
  second = learned[np.flatnonzero(np.diff(learned) > 1)[0] + 1]
  for history in ([('<video>\n' + Q0, A0)], [(Q0, A0)]):
    np.testing.assert_array_equal(text.generation_prompt_ids(tok, Q1, history=history),
                                  ids[:second])
  text_only = text.generation_prompt_ids(tok, Q0, num_frames=0)
  assert not np.any(text_only == IMAGE_TOKEN_INDEX)
  assert tok.decode([int(i) for i in text_only], skip_special_tokens=True) == (
      text.SYSTEM_PROMPT + ' USER: ' + Q0 + ' ASSISTANT:')


# ---------------------------------------------------------------------------------------------
# Errors and the reference's mismatch behaviour.


@pytest.mark.parametrize('turns,match', [
    ([(Q0, A0)], 'no <video>'),
    ([('<video>\n<video>\n' + Q0, A0)], 'more than one'),
    ([('<video>\n' + Q0, A0), ('<video>\n' + Q1, A1)], 'more than one'),
    ([('<video>\n<image>\n' + Q0, A0)], 'more than one'),
    ([('<image>\n' + Q0 + '<image>', A0)], 'more than one'),
    ([('<video>\n' + Q0, A0 + ' <video>')], 'in the answer'),
    ([(Q0 + ' <video>', A0)], 'twice'),
    ([('<video>', A0)], 'twice'),
    ([('<video>\n' + Q0, None)], 'no answer'),
    ([('<video>\n' + Q0, '')], 'non-empty'),
    ([{'from': 'human', 'value': '<video>\n' + Q0}, {'from': 'assistant', 'value': A0}],
     "unknown role 'assistant'"),
    ([{'from': 'human', 'value': '<video>\n' + Q0}, {'from': 'human', 'value': A0}],
     'alternate'),
    ([{'from': 'human', 'text': Q0}], "'from' and 'value'"),
    ([('<video>\n' + Q0, A0, 'extra')], 'pair'),
    ([7], 'pair'),
    ('<video>\n' + Q0, 'list of messages'),
    ([('<video>\n' + Q0, 3)], 'must be strings'),
    ([{'from': ['human'], 'value': '<video>\n' + Q0}], 'unknown role'),
])
def test_conversation_errors(tok, turns, match):
  """Everything wrong with the conversation itself is a ConversationError (a ValueError), the
  one kind of error the training pipeline turns into a `bad_conversation` skip."""
  with pytest.raises(text.ConversationError, match=match):
    text.tokenize_conversation(tok, turns)


def test_argument_errors(tok):
  with pytest.raises(text.ConversationError, match='num_frames=0'):
    text.tokenize_conversation(tok, [('<video>\n' + Q0, A0)], num_frames=0)
  with pytest.raises(text.ConversationError, match='history turn 0'):
    text.generation_prompt_ids(tok, Q1, history=[('<video>\n' + Q0, None)])
  with pytest.raises(text.ConversationError, match='more than one'):
    text.generation_prompt_ids(tok, '<video>\n' + Q1, history=[('<video>\n' + Q0, A0)])
  # A bad argument is not the conversation's fault (the pipeline must not skip on it).
  for kwargs, match in (({'on_mismatch': 'ignore'}, 'on_mismatch'),
                        ({'num_frames': -1}, 'num_frames=-1')):
    with pytest.raises(ValueError, match=match) as e:
      text.tokenize_conversation(tok, [('<video>\n' + Q0, A0)], **kwargs)
    assert not isinstance(e.value, text.ConversationError)


def test_separator_inside_a_message(tok):
  """The reference splits rounds at '</s>' / ' ASSISTANT: ': such a sample gets all -100."""
  turns = [('<video>\nSay " ASSISTANT: " please', A0)]
  with pytest.raises(text.TokenizationMismatchError, match='template separator'):
    text.tokenize_conversation(tok, turns)
  assert issubclass(text.TokenizationMismatchError, text.ConversationError)
  with pytest.warns(UserWarning, match='tokenization mismatch'):
    ids, labels = text.tokenize_conversation(tok, turns, on_mismatch='mask')
  assert np.all(labels == IGNORE_INDEX) and np.sum(ids == IMAGE_TOKEN_INDEX) == 8


def test_non_legacy_tokenizer_mismatch(tok, tok_dir):
  """Without the '▁' prefix after '</s>', the reference's offsets are off for later rounds."""
  new = text.load_tokenizer(tok_dir, model_max_length=512, legacy=False)
  single = [('<video>\n' + Q0, A0)]
  for a, b in zip(text.tokenize_conversation(new, single), text.tokenize_conversation(tok, single)):
    np.testing.assert_array_equal(a, b)
  multi = [('<video>\n' + Q0, A0), (Q1, A1)]
  with pytest.raises(text.TokenizationMismatchError, match='legacy=True'):
    text.tokenize_conversation(new, multi)
  with pytest.warns(UserWarning, match='tokenization mismatch'):
    ids, labels = text.tokenize_conversation(new, multi, on_mismatch='mask')
  assert np.all(labels == IGNORE_INDEX)
  # The reference skips its check when the sequence reaches model_max_length.
  new.model_max_length = 16
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _, labels = text.tokenize_conversation(new, multi, on_mismatch='mask')
  assert np.any(labels != IGNORE_INDEX)
  # 'mask' on a consistent tokenizer changes nothing.
  for a, b in zip(text.tokenize_conversation(tok, multi, on_mismatch='mask'),
                  text.tokenize_conversation(tok, multi)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# The golden file's label structure.


def test_masking_rule_reproduces_golden_labels():
  """Reference masking on the golden's segment layout gives the golden labels exactly.

  The golden uses random word ids, so the round lengths come from its layout: a round's
  instruction runs from its start (after BOS for the first) through 'ASSISTANT:', and the round
  ends with the '</s>' after its answer.
  """
  from panda_jax.golden import case_path
  with np.load(case_path('video_panda_tiny')) as z:
    meta = json.loads(str(z['meta']))
    inputs = {k.partition('/')[2]: z[k] for k in z.files if k.startswith('input/')}
  layouts = meta['conversation']['layouts_[name,start,end)']
  ids_all, labels_all = inputs['input_ids'], inputs['labels']
  assert len(layouts) == ids_all.shape[0] == 2
  for b, layout in enumerate(layouts):
    rounds, start = [], 1
    for name, s, e in layout:
      if name == 'role_assistant':
        instruction_len = e - start
      if name == 'eos':
        rounds.append((instruction_len, e - start))
        start = e
    ids = ids_all[b]
    labels, cur_len, total_len = text.mask_rounds(ids, rounds, pad_id=0)
    np.testing.assert_array_equal(labels, labels_all[b])
    assert cur_len == total_len == int(inputs['attention_mask'][b].sum())
    assert len(rounds) == (1, 2)[b]
    # The golden layout: BOS once, then the 8 image ids right after 'USER:' and before '\n'.
    seg = {}
    for name, s, e in layout:
      seg.setdefault(name, (s, e))   # first occurrence
    assert ids[0] == 1 and np.sum(ids == 1) == 1
    s, e = seg['video_placeholders']
    assert e - s == 8 and np.all(ids[s:e] == IMAGE_TOKEN_INDEX)
    assert np.sum(ids == IMAGE_TOKEN_INDEX) == 8
    assert seg['role_user'][1] == s and seg['newline'][0] == e and ids[e] == 13
  # The greedy prompt is sample 0 up to and including ' ASSISTANT:'.
  end = dict((n, e) for n, _, e in layouts[0])['role_assistant']
  np.testing.assert_array_equal(inputs['greedy_prompt_ids'][0], ids_all[0, :end])


def test_split_punctuation_keeps_words_whole_and_apart_from_punctuation(tmp_path):
  corpus = ['Is the blue triangle visible?\nAnswer with a word.',
            'Which appears first, the red square or the blue triangle?\nAnswer with a word.',
            'The blue triangle moves left.'] * 50
  s = 'Which appears first, the red square or the blue triangle?\nAnswer with a word.'
  fused = text.load_tokenizer(text.build_tokenizer(str(tmp_path / 'a'), corpus, vocab_size=400))
  split = text.load_tokenizer(text.build_tokenizer(str(tmp_path / 'b'), corpus, vocab_size=400,
                                                   split_punctuation=True))
  # Without the option the templated corpus teaches pieces across '?' and the line break.
  assert any('?' in p and len(p) > 1 for p in fused.tokenize(s))
  pieces = split.tokenize(s)
  assert '▁triangle' in pieces and '?' in pieces and '▁first' in pieces and ',' in pieces
  assert all(len(p) == 1 or not any(c in p for c in '?,.\n') for p in pieces)
  # The same word is the same token before punctuation and before a space.
  tri = split.convert_tokens_to_ids('▁triangle')
  assert split(s)['input_ids'].count(tri) == 1
  assert tri in split('The blue triangle moves left.')['input_ids']
  assert split.decode(split(s)['input_ids'][1:]) == s


def test_memo_tokenizer_gives_the_tokenizers_ids(tok):
  import pickle
  memo = text.MemoTokenizer(tok, size=3)
  turns = [(Q0 + '\n<video>', A0), (Q1, A1), (Q2, A2)]
  want = text.tokenize_conversation(tok, turns, num_frames=4)
  for _ in range(2):                       # the second time from what it remembered
    got = text.tokenize_conversation(memo, turns, num_frames=4)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
  assert len(memo._ids) == 3               # no more strings kept than asked
  for s in ('a b', Q0, Q0 + ' ' + A0, ''):
    assert memo(s).input_ids == list(tok(s).input_ids)
  ids = memo(Q0).input_ids
  ids.append(-1)                           # a caller's list is its own
  assert memo(Q0).input_ids == list(tok(Q0).input_ids)
  # Options and batches go to the tokenizer itself; attributes are the tokenizer's.
  assert memo(Q0, add_special_tokens=False).input_ids == list(
      tok(Q0, add_special_tokens=False).input_ids)
  assert memo([Q0, Q1]).input_ids == tok([Q0, Q1]).input_ids
  assert (memo.bos_token_id, memo.pad_token_id, len(memo)) == (
      tok.bos_token_id, tok.pad_token_id, len(tok))
  # Underscore names too (transformers' own helpers read some from a tokenizer).
  import types
  assert text.MemoTokenizer(types.SimpleNamespace(_private=3))._private == 3
  with pytest.raises(AttributeError):
    memo._no_such_attribute
  again = pickle.loads(pickle.dumps(memo))  # Grain's worker processes
  assert again(Q1).input_ids == list(tok(Q1).input_ids)
