"""Tokenizer, the Vicuna "v1" conversation template and training labels.

Templates by name (`vicuna_v1`, `videopanda_v1`: this module's; `chatml`: SmolLM2's) are in
`panda_jax.data.templates`, which training and prediction use.

Spec section 4. A conversation is a list of turns `(human, gpt)`; the data files hold it as
`[{'from': 'human', 'value': ...}, {'from': 'gpt', 'value': ...}, ...]` (`as_turns`). The
prompt is (SeparatorStyle.TWO, `sep=' '`, `sep2='</s>'`)

    SYSTEM + ' ' + 'USER: ' + q0 + ' ' + 'ASSISTANT: ' + a0 + '</s>' + 'USER: ' + q1 + ...

and a generation prompt ends with `'ASSISTANT:'` (no space). The video placeholder (`<video>`,
or `<image>`) becomes `num_frames` `<image>` markers, and every `<image>` becomes one
`IMAGE_TOKEN_INDEX` (-200) id in the token stream: the text between markers is tokenized
piece by piece, each piece with its own BOS, keeping only the first BOS (the reference's
`tokenizer_image_token`). With the Llama tokenizer the block therefore sits between the '▁'
of "USER: " and the '▁' '<0x0A>' of "\\n...":

    <s> system.. ▁US ER : ▁ [-200]*num_frames ▁ <0x0A> question.. ▁ASS IST ANT : ▁answer.. </s>

Labels (`IGNORE_INDEX` = -100 where not learned) are computed exactly the way the reference's
`preprocess_v1` does, from per-round token counts: the conversation is split at '</s>' into
rounds, and for each round `round_len = len(tok(round))` (its BOS stands for the '</s>' that
the split removed) and `instruction_len = len(tok(round up to 'ASSISTANT: ')) - 2` (its BOS
and the trailing '▁' that the full text merges into the answer's first piece), starting after
the conversation's BOS. The offsets are right only when tokenizing the whole conversation
gives the concatenation of the rounds' tokens, which holds for the Llama SentencePiece
tokenizer in its legacy mode (a '▁' prefix also after '</s>'), the mode `load_tokenizer`
selects by default. Where it does not hold the reference prints "tokenization mismatch" and
silently masks the whole sample; here that is a `TokenizationMismatchError` (or, with
`on_mismatch='mask'`, the reference's all -100 labels and a warning).

Host side only (numpy and a Hugging Face tokenizer); nothing here runs on device. Sequences are
not truncated: batch them, right-pad ids with the pad id (0) and labels with -100, and cut at
`model_max_length`, as the reference's collator does.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence, Sized, Union

import numpy as np

from panda_jax import storage

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = '<image>'
VIDEO_PLACEHOLDER = '<video>'

# "v1" template. SYSTEM_PROMPT is the spec's, which is the reference's `videopanda_v1` template
# used at inference (run_inference_video_qa.py). The released training scripts pass
# `--version v1`, which selects `conv_vicuna_v1`: same template with "user" for "human".
SYSTEM_PROMPT = ('A chat between a curious human and an artificial intelligence assistant. '
                 "The assistant gives helpful, detailed, and polite answers to the human's "
                 'questions.')
VICUNA_V1_SYSTEM_PROMPT = ('A chat between a curious user and an artificial intelligence '
                           'assistant. The assistant gives helpful, detailed, and polite '
                           "answers to the user's questions.")
# By the reference's template names: training parity needs 'vicuna_v1', the spec (and the
# reference's inference) says 'videopanda_v1'.
SYSTEM_PROMPTS = {'videopanda_v1': SYSTEM_PROMPT, 'vicuna_v1': VICUNA_V1_SYSTEM_PROMPT}
ROLES = ('USER', 'ASSISTANT')
SEP = ' '        # after the system prompt and after each user turn
SEP2 = '</s>'    # after each assistant turn
# What the reference splits a round at (`conv.sep + conv.roles[1] + ': '`).
ASSISTANT_SEP = SEP + ROLES[1] + ': '
# Speaker names in the data files, and their position in a turn.
DATA_ROLES = {'human': 0, 'gpt': 1}

Turn = tuple[str, Union[str, None]]
Conversation = Union[Sequence[Turn], Sequence[Mapping[str, str]]]


class ConversationError(ValueError):
  """A conversation (the data) that cannot be written as a prompt: not (human, gpt) pairs,
  speakers out of order, an empty or unanswered turn, a missing, doubled or misplaced visual
  placeholder, a template's own token inside a message, or a tokenization mismatch.

  The training pipeline skips such a sample (`bad_conversation`); any other error raised while
  tokenising (a setting, a tokenizer that cannot write the template, a bug) propagates.
  """


class TokenizationMismatchError(ConversationError):
  """The reference's per-round offsets do not add up for this tokenizer and conversation.

  The reference (`preprocess_v1`) would print "WARNING: tokenization mismatch" and set every
  label of the sample to -100 (the sample then trains nothing).
  """


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def load_tokenizer(path: str | os.PathLike, model_max_length: int = 4096,
                   use_fast: bool | None = None, legacy: bool | None = True,
                   force_bos: bool | None = None) -> Any:
  """The tokenizer from a local directory, set up the way Video-Panda uses it.

  The directory (local or `gs://`; a remote one is copied to the local cache first,
  `storage.local_copy`) holds `tokenizer.json` and/or the SentencePiece `tokenizer.model` (with
  `tokenizer_config.json`), as a Hugging Face checkpoint does; nothing is downloaded.

  Two set-ups, chosen by `force_bos`:
    * Llama (Vicuna; the `vicuna_v1` / `videopanda_v1` templates), reference train.py
      `train()`: BOS added, no EOS added, right padding, pad token = unk token (id 0; set
      unconditionally, as the reference does for the v1 template), `model_max_length`; checked
      by `check_tokenizer`.
    * The tokenizer's own (a GPT-2-style BPE such as SmolLM2's, for the `chatml` template):
      BOS and EOS added or not as its files say (SmolLM2 adds neither), right padding,
      `model_max_length`; pad token: its own pad token, else its EOS (it need not have an unk
      token). Nothing is forced: forcing BOS on SmolLM2's would prepend `<|im_start|>`.

  Args:
    path: the directory.
    model_max_length: longest sequence (the reference trains with 4096).
    use_fast: passed to `AutoTokenizer` (recent transformers always build the Rust tokenizer).
      None: the reference's slow SentencePiece tokenizer when `tokenizer.model` is there and
      the `sentencepiece` package is installed, the fast one otherwise.
    legacy: Llama's `legacy` switch. True (default): text that follows a special token (the
      "USER" after "</s>") gets the SentencePiece '▁' prefix, as with the reference's
      transformers 4.31 slow tokenizer, so the reference's per-round label offsets hold for
      multi-turn conversations. False gives the newer behaviour, for which they do not (see
      `tokenize_conversation`). None keeps the directory's setting. Llama set-up only.
    force_bos: True: the Llama set-up; False: the tokenizer's own. None (default): the
      tokenizer's own when the directory has no `tokenizer.model` and its chat template (in
      `tokenizer_config.json` or `chat_template.jinja`) is ChatML (mentions `<|im_start|>`),
      the Llama set-up otherwise (today's behaviour for every Llama/SentencePiece tokenizer).
  Returns:
    the transformers tokenizer.
  Raises:
    FileNotFoundError / ValueError naming `path` if it cannot be loaded, has no token to pad
    with, or (Llama set-up) does not add BOS.
  """
  path = os.fspath(path)
  if not storage.isdir(path):
    raise FileNotFoundError(f'tokenizer directory {path!r} does not exist')
  has_json = storage.isfile(storage.join(path, 'tokenizer.json'))
  has_spm = storage.isfile(storage.join(path, 'tokenizer.model'))
  if not has_json and not has_spm:
    raise FileNotFoundError(f'{path!r} holds neither tokenizer.json nor tokenizer.model')
  shown, path = path, storage.local_copy(path)    # transformers reads local files only
  try:
    import sentencepiece  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    has_sentencepiece = True
  except ImportError:
    has_sentencepiece = False
  if has_spm and not has_json and not has_sentencepiece:
    raise ValueError(f'{shown!r} holds only tokenizer.model, which needs the sentencepiece '
                     'package (pip install sentencepiece), or add a tokenizer.json')
  if use_fast is None:
    use_fast = not (has_spm and has_sentencepiece)
  if force_bos is None:
    force_bos = has_spm or '<|im_start|>' not in _chat_template_text(path)

  import transformers  # pylint: disable=import-outside-toplevel
  kwargs: dict[str, Any] = dict(model_max_length=model_max_length, padding_side='right')
  if force_bos:
    kwargs.update(add_bos_token=True, add_eos_token=False)
    if legacy is not None:
      kwargs['legacy'] = legacy
  try:
    tok = transformers.AutoTokenizer.from_pretrained(path, use_fast=use_fast,
                                                     local_files_only=True, **kwargs)
  except Exception as e:  # transformers raises many kinds; say which directory failed
    raise ValueError(f'cannot load a tokenizer from {shown!r}: {type(e).__name__}: {e}') from e
  if force_bos:
    if tok.unk_token is not None:
      tok.pad_token = tok.unk_token
    elif tok.pad_token is None:
      raise ValueError(f'tokenizer at {shown!r} has neither an unk nor a pad token to pad with')
  elif tok.pad_token is None:
    if tok.eos_token is None:
      raise ValueError(f'tokenizer at {shown!r} has neither a pad nor an EOS token to pad with')
    tok.pad_token = tok.eos_token
  tok.model_max_length = model_max_length
  tok.padding_side = 'right'
  if force_bos:
    check_tokenizer(tok, where=shown)
  return tok


def _chat_template_text(path: str) -> str:
  """The chat template(s) saved in the tokenizer directory `path` ('' when none)."""
  found = ''
  jinja = storage.join(path, 'chat_template.jinja')
  if storage.isfile(jinja):
    found += storage.read_text(jinja)
  config = storage.join(path, 'tokenizer_config.json')
  if storage.isfile(config):
    try:
      found += json.dumps(storage.read_json(config).get('chat_template') or '')
    except (OSError, ValueError):
      pass   # from_pretrained reports a broken config, naming the directory
  return found


class _Ids:
  """What a tokenizer call returns, as far as this module reads it (`input_ids`)."""
  __slots__ = ('input_ids',)

  def __init__(self, ids):
    self.input_ids = ids


class MemoTokenizer:
  """A loaded tokenizer whose calls on one string are remembered (up to `size` strings).

  The training pipeline tokenizes every conversation piece by piece, and the reference's label
  offsets tokenize each round twice more: 16 calls for a three-turn demo conversation, most of
  them on text every sample repeats (the system prompt, the template, the questions of a
  synthetic set). For a tokenizer nobody changes after loading (the pipeline's own) the ids
  are the same every time, so they are kept. Everything else (attributes, calls with options)
  goes to the wrapped tokenizer. Picklable (Grain workers); the dict is safe across reader
  threads under the GIL (two threads may tokenize the same string once each).
  """

  def __init__(self, tokenizer: Any, size: int = 1 << 16):
    self._tokenizer = tokenizer
    self._size = size
    self._ids: dict[str, tuple[int, ...]] = {}

  def __call__(self, text: Any, **kwargs):
    if kwargs or not isinstance(text, str):
      return self._tokenizer(text, **kwargs)
    ids = self._ids.get(text)
    if ids is None:
      ids = tuple(self._tokenizer(text).input_ids)
      if len(self._ids) < self._size:
        self._ids[text] = ids
    return _Ids(list(ids))

  def __getattr__(self, name: str):
    # Only reached for names this object lacks. Unpickling looks some up before __init__ has
    # run, when there is no wrapped tokenizer to ask yet (and `self._tokenizer` would recurse).
    tokenizer = self.__dict__.get('_tokenizer')
    if tokenizer is None:
      raise AttributeError(name)
    return getattr(tokenizer, name)

  def __len__(self) -> int:
    return len(self._tokenizer)


def check_tokenizer(tokenizer: Any, where: str = 'tokenizer') -> None:
  """Raise ValueError unless `tokenizer` adds one BOS, no EOS, and has BOS/EOS/pad ids."""
  for name in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
    if getattr(tokenizer, name, None) is None:
      raise ValueError(f'{where}: {name} is not set')
  ids = list(tokenizer('a b').input_ids)
  if not ids or ids[0] != tokenizer.bos_token_id or ids.count(tokenizer.bos_token_id) != 1:
    raise ValueError(f'{where}: expected one BOS ({tokenizer.bos_token_id}) at the start of '
                     f"tokenizer('a b').input_ids, got {ids} (use load_tokenizer or set "
                     'add_bos_token=True)')
  if ids[-1] == tokenizer.eos_token_id:
    raise ValueError(f'{where}: the tokenizer appends EOS ({tokenizer.eos_token_id}); the v1 '
                     'template writes "</s>" itself (set add_eos_token=False)')


def adds_bos(tokenizer: Any) -> bool:
  """Whether `tokenizer(text)` starts with the BOS id it adds (tried on plain text)."""
  ids = list(tokenizer('a b').input_ids)
  return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def tokenizer_image_token(tokenizer: Any, prompt: str, bos: bool | None = None) -> list[int]:
  """Token ids of `prompt` with one IMAGE_TOKEN_INDEX per `<image>` marker.

  The reference's `mm_utils.tokenizer_image_token`: the text between markers is tokenized
  piece by piece (each piece on its own, with BOS); the first piece keeps its BOS, the others
  lose their first token (their BOS) when the tokenizer adds one. Since the markers are split
  off before tokenizing, they are never word pieces, whatever the tokenizer.

  Args:
    bos: whether the tokenizer adds a BOS (`adds_bos`). None: the reference's test, the first
      piece starting with the BOS id, which is wrong for a tokenizer whose BOS is a token the
      text itself starts with (SmolLM2's BOS is `<|im_start|>`): pass it for those.
  Returns:
    ids, a list of length (tokens of the pieces, without the dropped BOS) + (number of markers).
  """
  chunks = [list(tokenizer(c).input_ids) for c in prompt.split(IMAGE_PLACEHOLDER)]
  ids: list[int] = []
  skip = 0
  if bos is None:
    bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
  if bos:
    skip = 1
    ids.append(chunks[0][0])
  for i, chunk in enumerate(chunks):
    if i:
      ids.append(IMAGE_TOKEN_INDEX)
    ids.extend(chunk[skip:])
  return ids


# ---------------------------------------------------------------------------------------------
# Conversations and the template.


def as_turns(conversation: Conversation) -> list[Turn]:
  """`(human, gpt)` pairs from a data file's message list (pairs pass through, checked).

  Messages are dicts with 'from' in {'human', 'gpt'} and a string 'value'. As in the
  reference, a leading 'gpt' message is dropped; after it speakers must alternate, starting
  with 'human'. A final unanswered 'human' message gives a turn `(question, None)`.
  """
  if isinstance(conversation, (str, bytes, Mapping)) or not isinstance(conversation, Iterable):
    raise ConversationError(f'expected a list of messages or (human, gpt) pairs, got '
                            f'{conversation!r}')
  conversation = list(conversation)
  if not conversation or not isinstance(conversation[0], Mapping):
    turns = []
    for i, t in enumerate(conversation):
      if isinstance(t, (str, bytes, Mapping)) or not isinstance(t, Sized) or len(t) != 2:
        raise ConversationError(f'turn {i}: expected a (human, gpt) pair, got {t!r}')
      turns.append((t[0], t[1]))
    return turns
  roles = []
  for i, m in enumerate(conversation):
    if not isinstance(m, Mapping) or 'from' not in m or 'value' not in m:
      raise ConversationError(f"message {i}: expected a dict with 'from' and 'value', got "
                              f'{m!r}')
    if not isinstance(m['from'], str) or m['from'] not in DATA_ROLES:
      raise ConversationError(f"message {i}: unknown role {m['from']!r}; expected one of "
                              f'{sorted(DATA_ROLES)}')
    roles.append(DATA_ROLES[m['from']])
  if roles[0] == 1:  # reference: "Skip the first one if it is not from human"
    conversation, roles = conversation[1:], roles[1:]
  for j, r in enumerate(roles):
    if r != j % 2:
      raise ConversationError(
          f"message {j}: expected a {'human' if j % 2 == 0 else 'gpt'} message (speakers "
          f'must alternate, starting with human), got {conversation[j]!r}')
  values = [m['value'] for m in conversation]
  if len(values) % 2:
    values.append(None)
  return [(values[k], values[k + 1]) for k in range(0, len(values), 2)]


def _placeholder(text: str, num_frames: int, where: str) -> str | None:
  """The placeholder string in `text` (None when there is none); error if ambiguous."""
  n_vid = text.count(VIDEO_PLACEHOLDER)
  n_img = text.count(IMAGE_PLACEHOLDER)
  if n_vid + n_img == 0:
    return None
  if (n_vid, n_img) in ((1, 0), (0, 1)):
    return VIDEO_PLACEHOLDER if n_vid else IMAGE_PLACEHOLDER
  run = IMAGE_PLACEHOLDER * num_frames
  if n_vid == 0 and n_img == num_frames and run in text:
    return run  # already expanded (the reference's inference prompts are written this way)
  raise ConversationError(
      f'{where}: more than one visual placeholder ({n_vid} x {VIDEO_PLACEHOLDER}, {n_img} x '
      f'{IMAGE_PLACEHOLDER}) in {text!r}; expected one {VIDEO_PLACEHOLDER} (or '
      f'{IMAGE_PLACEHOLDER}) per conversation')


def expand_placeholders(turns: Conversation, num_frames: int = 8,
                        insert_missing: bool = False) -> list[Turn]:
  """Turns with the video placeholder written as `num_frames` `<image>` markers.

  The reference's `preprocess_multimodal`: a human message that ends with the placeholder
  ("Q\\n<video>") has it moved to the front ("<video>\\nQ", stripped); elsewhere it stays
  where it is. `<video>`, a single `<image>`, or an already expanded run of `num_frames`
  `<image>` each count as the one placeholder. (The reference keeps a lone `<image>`, for
  still images, as one marker; Video-Panda's videos always use `num_frames`.)

  Args:
    turns: `(human, gpt)` pairs or data-file messages (`as_turns`).
    num_frames: markers per video; 0 for a text-only conversation.
    insert_missing: when no turn has a placeholder, prepend `'<image>' * num_frames + '\\n'`
      to the first question (what the reference's inference script does).
  Raises:
    ConversationError for a missing placeholder (frames given), a placeholder with
    num_frames=0, more than one placeholder, one in an answer, or one at the end of a question
    without a newline before it (the reference would then write it twice); ValueError for
    num_frames < 0.
  """
  turns = as_turns(turns)
  if not turns:
    raise ConversationError('empty conversation')
  if num_frames < 0:
    raise ValueError(f'num_frames={num_frames} must be >= 0')
  out: list[Turn] = []
  found = None
  for i, (human, gpt) in enumerate(turns):
    if not isinstance(human, str) or (gpt is not None and not isinstance(gpt, str)):
      raise ConversationError(f'turn {i}: messages must be strings, got {(human, gpt)!r}')
    if gpt is not None and (VIDEO_PLACEHOLDER in gpt or IMAGE_PLACEHOLDER in gpt):
      raise ConversationError(f'turn {i}: visual placeholder in the answer {gpt!r}; it belongs '
                              'in a human turn')
    ph = _placeholder(human, num_frames, f'turn {i}')
    if ph is not None:
      if num_frames == 0:
        raise ConversationError(f'turn {i}: {human!r} has a visual placeholder but '
                                'num_frames=0')
      if found is not None:
        raise ConversationError(f'more than one visual placeholder: turns {found} and {i}')
      found = i
      if human.endswith(ph):
        rest = human.replace('\n' + ph, '').strip()
        if ph in rest:
          raise ConversationError(
              f'turn {i}: {human!r} ends with {ph!r} without a newline before it; the '
              'reference would write the placeholder twice. Use "Q\\n<video>" or "<video>\\nQ"')
        human = (ph + '\n' + rest).strip()
      human = human.replace(ph, IMAGE_PLACEHOLDER * num_frames)
    out.append((human, gpt))
  if found is None and num_frames > 0:
    if not insert_missing:
      raise ConversationError(
          f'no {VIDEO_PLACEHOLDER} (or {IMAGE_PLACEHOLDER}) placeholder in any human turn, but '
          f'num_frames={num_frames}; put "{VIDEO_PLACEHOLDER}\\n" before the first question, or '
          'pass num_frames=0 for text only')
    if out:
      out[0] = (IMAGE_PLACEHOLDER * num_frames + '\n' + out[0][0], out[0][1])
  return out


def build_prompt(turns: Conversation, system: str = SYSTEM_PROMPT) -> str:
  """The v1 prompt string of `turns` (reference `Conversation.get_prompt`, SeparatorStyle.TWO).

  Placeholders are left as written (see `expand_placeholders`). Only the last turn may have
  `gpt=None`: the prompt then ends with 'ASSISTANT:' (the generation prompt).
  """
  turns = as_turns(turns)
  if not turns:
    raise ConversationError('empty conversation')
  parts = [system, SEP]
  for i, (human, gpt) in enumerate(turns):
    if not isinstance(human, str) or not human:
      raise ConversationError(f'turn {i}: the question must be a non-empty string, got '
                              f'{human!r}')
    parts += [ROLES[0], ': ', human, SEP]
    if gpt is None:
      if i != len(turns) - 1:
        raise ConversationError(f'turn {i}: only the last turn may be unanswered '
                                '(gpt=None)')
      parts += [ROLES[1], ':']
    else:
      if not isinstance(gpt, str) or not gpt:
        raise ConversationError(f'turn {i}: the answer must be a non-empty string (or None '
                                f'for the generation prompt), got {gpt!r}')
      parts += [ROLES[1], ': ', gpt, SEP2]
  return ''.join(parts)


# ---------------------------------------------------------------------------------------------
# Labels.


def mask_rounds(input_ids: np.ndarray, rounds: Sequence[tuple[int, int]],
                pad_id: int = 0) -> tuple[np.ndarray, int, int]:
  """The reference's v1 masking, given each round's token counts.

  Args:
    input_ids: int [T], one sequence (right padding with `pad_id` allowed).
    rounds: per round `(instruction_len, round_len)`: the round spans `round_len` ids (its
      '</s>' included) of which the first `instruction_len` (user turn and 'ASSISTANT:') are
      not learned. Rounds start after the BOS at position 0.
  Returns:
    labels int32 [T] (`input_ids` where learned, IGNORE_INDEX elsewhere), `cur_len` (1 + the
    sum of round lengths) and `total_len` (number of ids != pad_id). The reference treats
    `cur_len != total_len` as a tokenization mismatch.
  """
  input_ids = np.asarray(input_ids)
  labels = input_ids.astype(np.int32).copy()
  cur = 1
  labels[:cur] = IGNORE_INDEX
  for instruction_len, round_len in rounds:
    labels[cur:cur + instruction_len] = IGNORE_INDEX
    cur += round_len
  labels[cur:] = IGNORE_INDEX
  total = int(np.sum(input_ids != pad_id))
  return labels, cur, total


def _reference_rounds(tokenizer: Any, prompt: str) -> list[tuple[int, int]]:
  """Per-round (instruction_len, round_len) exactly as the reference's preprocess_v1 counts."""
  rounds = []
  for rou in prompt.split(SEP2):
    if rou == '':
      break
    parts = rou.split(ASSISTANT_SEP)
    if len(parts) != 2:
      break
    round_len = len(tokenizer_image_token(tokenizer, rou))
    instruction_len = len(tokenizer_image_token(tokenizer, parts[0] + ASSISTANT_SEP)) - 2
    rounds.append((instruction_len, round_len))
  return rounds


def tokenize_conversation(tokenizer: Any, turns: Conversation, num_frames: int = 8,
                          system: str = SYSTEM_PROMPT,
                          on_mismatch: str = 'raise') -> tuple[np.ndarray, np.ndarray]:
  """Token ids and labels of one training conversation.

  Args:
    tokenizer: from `load_tokenizer` (adds BOS, not EOS; pad id = unk id 0).
    turns: `(human, gpt)` pairs or data-file messages; every turn answered. One human turn
      (normally the first) holds the video placeholder when `num_frames > 0`.
    num_frames: IMAGE_TOKEN_INDEX ids for the video; 0 for text only.
    system: the system prompt (SYSTEM_PROMPT, or VICUNA_V1_SYSTEM_PROMPT as in the reference's
      training scripts).
    on_mismatch: 'raise' (default): TokenizationMismatchError where the reference's offsets do
      not add up (its length check) or a round does not end on '</s>' (a check the reference
      lacks). 'mask': the reference exactly: all labels IGNORE_INDEX and a warning, only from
      its length check, and only when the sequence is shorter than `model_max_length`.
  Returns:
    input_ids int32 [T]: one BOS at 0, `num_frames` consecutive IMAGE_TOKEN_INDEX.
    labels int32 [T]: IGNORE_INDEX on BOS, system prompt, user turns, 'ASSISTANT:', the image
      ids; the token ids of each answer and of the '</s>' after it elsewhere.
  Raises:
    ConversationError (TokenizationMismatchError among them) when the conversation cannot be
    written; ValueError for a bad argument or a tokenizer `check_tokenizer` refuses.
  """
  if on_mismatch not in ('raise', 'mask'):
    raise ValueError(f"on_mismatch={on_mismatch!r}; expected 'raise' or 'mask'")
  turns = expand_placeholders(turns, num_frames)
  for i, (human, gpt) in enumerate(turns):
    if gpt is None:
      raise ConversationError(f'turn {i} has no answer; use generation_prompt_ids for a '
                              'prompt that ends with "ASSISTANT:"')
    if on_mismatch == 'raise':
      for value in (human, gpt):
        for bad in (SEP2, ASSISTANT_SEP):
          if bad in value:
            raise TokenizationMismatchError(
                f'turn {i}: {value!r} contains the template separator {bad!r}; the reference '
                'splits rounds at it and would mask this sample')
  check_tokenizer(tokenizer)
  prompt = build_prompt(turns, system)
  input_ids = np.asarray(tokenizer_image_token(tokenizer, prompt), np.int32)
  rounds = _reference_rounds(tokenizer, prompt)
  labels, cur_len, total_len = mask_rounds(input_ids, rounds, tokenizer.pad_token_id)

  problems = []
  if cur_len != total_len:
    msg = (f'the rounds add up to {cur_len} tokens but the conversation has {total_len} '
           f'non-pad tokens ({len(input_ids)} in all)')
    n_pad = int(np.sum(input_ids == tokenizer.pad_token_id))
    if n_pad:
      msg += (f'; {n_pad} of its tokens are the pad/unk id {tokenizer.pad_token_id}, which the '
              'reference does not count')
    if len(rounds) > 1 and not getattr(tokenizer, 'legacy', True):
      msg += ('; the tokenizer is in non-legacy mode (no "▁" prefix after "</s>"): load it '
              'with load_tokenizer(..., legacy=True)')
    problems.append(msg)
  if on_mismatch == 'mask':
    if problems and cur_len < tokenizer.model_max_length:
      warnings.warn(f'tokenization mismatch: {cur_len} vs. {total_len}; all labels ignored, '
                    'as the reference does')
      labels[:] = IGNORE_INDEX
    return input_ids, labels

  if len(rounds) != len(turns):
    problems.append(f'{len(rounds)} rounds found for {len(turns)} turns')
  end = 1
  for k, (_, round_len) in enumerate(rounds):
    end += round_len
    if end > len(input_ids) or input_ids[end - 1] != tokenizer.eos_token_id:
      problems.append(f'round {k} does not end on "</s>" (id {tokenizer.eos_token_id})')
      break
  n_img = int(np.sum(input_ids == IMAGE_TOKEN_INDEX))
  if n_img != num_frames:
    problems.append(f'{n_img} image ids for num_frames={num_frames}')
  if problems:
    raise TokenizationMismatchError('; '.join(problems) + '. The reference would set every '
                                    'label of this sample to -100.')
  return input_ids, labels


def generation_prompt_ids(tokenizer: Any, question: str, num_frames: int = 8,
                          history: Conversation = (), system: str = SYSTEM_PROMPT) -> np.ndarray:
  """Prompt ids for greedy decoding, ending with the tokens of 'ASSISTANT:'.

  Args:
    tokenizer: from `load_tokenizer`.
    question: the user's question. When no turn has a placeholder, the video markers are put
      in front of the first question as the reference's inference script does
      (`'<image>' * num_frames + '\\n' + question`).
    num_frames: IMAGE_TOKEN_INDEX ids; 0 for text only.
    history: earlier answered `(human, gpt)` turns of the same conversation.
    system: the system prompt.
  Returns:
    int32 [T]: the training ids of the same conversation up to and including 'ASSISTANT:'.
    Decoding stops at '</s>'.
  """
  turns = as_turns(history) + [(question, None)]
  for i, (_, gpt) in enumerate(turns[:-1]):
    if gpt is None:
      raise ConversationError(f'history turn {i} has no answer')
  turns = expand_placeholders(turns, num_frames, insert_missing=True)
  check_tokenizer(tokenizer)
  return np.asarray(tokenizer_image_token(tokenizer, build_prompt(turns, system)), np.int32)


def build_tokenizer(dirname, corpus, vocab_size: int = 450, tokenizer_class='LlamaTokenizer',
                    legacy=False, post_processor=True, split_punctuation: bool = False):
  """Trains a small Llama-style tokenizer on `corpus` and writes it as a Hugging Face directory.

  BPE with byte fallback (ids 3..258 are the bytes, so '\\n' is 13 as in Llama), `<unk>`=0,
  `<s>`=1, `</s>`=2, Llama-2's `tokenizer.json` pipeline. For tests and the synthetic tiny runs,
  where no released tokenizer can be downloaded.

  `split_punctuation`: merges never join punctuation or a line break to a word, as in Llama-2's
  vocabulary ('triangle', '?', '\\n' instead of one 'triangle?\\nAnswer' piece, which a small
  corpus of templated sentences otherwise learns), so a word is the same token wherever it
  stands.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers

  tok = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  # Train on words (merges never span a '▁'), then switch to Llama-2's tokenizer.json pipeline.
  tok.normalizer = normalizers.Replace(' ', '▁')
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always')
  if split_punctuation:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split('\n', behavior='isolated'),
        pre_tokenizers.Punctuation(behavior='isolated'), tok.pre_tokenizer])
  alphabet = sorted(set(''.join(corpus).replace(' ', '▁')))
  specials = ['<unk>', '<s>', '</s>'] + [f'<0x{i:02X}>' for i in range(256)]
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
  tok.pre_tokenizer = None
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'),
                                         normalizers.Replace(' ', '▁')])
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  if post_processor:
    tok.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)])
  os.makedirs(dirname, exist_ok=True)
  tok.save(os.path.join(dirname, 'tokenizer.json'))
  config = dict(tokenizer_class=tokenizer_class, bos_token='<s>', eos_token='</s>',
                unk_token='<unk>', pad_token=None, add_bos_token=True, add_eos_token=False,
                model_max_length=2048, clean_up_tokenization_spaces=False, legacy=legacy)
  with open(os.path.join(dirname, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  return dirname


# SmolLM2-Instruct's chat template (tokenizer_config.json), the ChatML form `templates.ChatML`
# writes.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_chatml_tokenizer(dirname, corpus, vocab_size: int = 400, unk: bool = True,
                           pad: bool = True, chat_template: str = SMOLLM2_CHAT_TEMPLATE):
  """Trains a small SmolLM2-style tokenizer on `corpus` and writes it as a Hugging Face directory.

  GPT-2 byte-level BPE (no BOS or EOS added), `<|endoftext|>`=0, `<|im_start|>`=1,
  `<|im_end|>`=2 as in SmolLM2: BOS `<|im_start|>`, EOS `<|im_end|>`, pad `<|im_end|>` (or
  none: `pad=False`), unk `<|endoftext|>` (or none: `unk=False`), its ChatML `chat_template`.
  For tests and tiny runs, where no released tokenizer can be downloaded.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  os.makedirs(dirname, exist_ok=True)
  tok.save(os.path.join(dirname, 'tokenizer.json'))
  config = dict(tokenizer_class='GPT2Tokenizer', bos_token='<|im_start|>',
                eos_token='<|im_end|>', pad_token='<|im_end|>' if pad else None,
                unk_token='<|endoftext|>' if unk else None, add_prefix_space=False,
                model_max_length=2048, clean_up_tokenization_spaces=False,
                chat_template=chat_template)
  with open(os.path.join(dirname, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  return dirname
