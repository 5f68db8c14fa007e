"""Conversation templates by name: how a conversation becomes prompt text, ids and labels.

One `Template` serves training (`tokenize`: ids and labels, only the assistant's answers and
their end-of-turn token learned), generation (`generation_ids`: the prompt up to and including
the assistant header) and decoding (`stop_id`: the end-of-turn id generation stops at).

    name            prompt                                                     end of turn
    videopanda_v1   SYSTEM USER: q ASSISTANT: a</s>USER: ...                   </s>
    vicuna_v1       the same with "curious user" in the system prompt          </s>
    chatml          <|im_start|>system\\n{system}<|im_end|>\\n                   <|im_end|>
                    <|im_start|>user\\n{q}<|im_end|>\\n
                    <|im_start|>assistant\\n{a}<|im_end|>\\n ...

The Vicuna templates are `text.py`'s, bit for bit (the reference's per-round label offsets,
Llama tokenizer with BOS). `chatml` is SmolLM2-Instruct's chat template (its default system
message `CHATML_SYSTEM`, always written, as SmolLM2's template does when none is given); the
tokenizer is used as its files say (SmolLM2's adds no BOS).

The video placeholder becomes `num_frames` `<image>` markers (`text.expand_placeholders`) and
the text is split at the markers before tokenizing, so a marker is never a word piece, whatever
the tokenizer. ChatML ids are the concatenation of separately tokenized segments, cut where
learning starts and stops: after the assistant header's '\\n' and after '<|im_end|>'. For a
GPT-2-style byte-level BPE (SmolLM2) both cuts are places its pre-tokenizer splits anyway, so
the ids equal those of the whole rendered text; training and generation use the same segments
in any case.

Host side only, like `text.py`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from panda_jax.data import text
from panda_jax.data.text import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Conversation, ConversationError

DEFAULT = 'videopanda_v1'
CHATML = 'chatml'
NAMES = ('videopanda_v1', 'vicuna_v1', CHATML)
CHATML_SYSTEM = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'
IM_START = '<|im_start|>'
IM_END = '<|im_end|>'


class Template:
  """A conversation template (see the module doc). `get` makes one by name."""
  name: str
  system: str
  # Whether `text.load_tokenizer` forces the Llama set-up (BOS added, pad = unk).
  force_bos: bool

  def prompt(self, turns: Conversation) -> str:
    """The prompt text of `turns` (placeholders as written); a last turn with answer None
    ends with the assistant header."""
    raise NotImplementedError

  def tokenize(self, tokenizer: Any, turns: Conversation, num_frames: int = 8,
               on_mismatch: str = 'raise') -> tuple[np.ndarray, np.ndarray]:
    """input_ids int32 [T] and labels int32 [T] of one answered training conversation;
    `text.ConversationError` (a TokenizationMismatchError among them) when the conversation
    cannot be written, ValueError for a bad argument or a tokenizer `check` refuses."""
    raise NotImplementedError

  def generation_ids(self, tokenizer: Any, question: str, num_frames: int = 8,
                     history: Conversation = ()) -> np.ndarray:
    """int32 [T]: the prompt for decoding, ending with the assistant header."""
    raise NotImplementedError

  def stop_id(self, tokenizer: Any) -> int:
    """The end-of-turn id decoding stops at."""
    raise NotImplementedError

  def check(self, tokenizer: Any) -> None:
    """ValueError unless `tokenizer` can write this template."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Vicuna(Template):
  """The reference's "v1" template (`text.build_prompt`, `text.tokenize_conversation`)."""
  name: str
  system: str
  force_bos: bool = True

  def prompt(self, turns: Conversation) -> str:
    return text.build_prompt(turns, self.system)

  def tokenize(self, tokenizer, turns, num_frames=8, on_mismatch='raise'):
    return text.tokenize_conversation(tokenizer, turns, num_frames=num_frames,
                                      system=self.system, on_mismatch=on_mismatch)

  def generation_ids(self, tokenizer, question, num_frames=8, history=()):
    return text.generation_prompt_ids(tokenizer, question, num_frames=num_frames,
                                      history=history, system=self.system)

  def stop_id(self, tokenizer) -> int:
    return tokenizer.eos_token_id    # '</s>'

  def check(self, tokenizer) -> None:
    text.check_tokenizer(tokenizer)
    if tokenizer.eos_token != text.SEP2:
      raise ValueError(f'the {self.name} template ends a turn with {text.SEP2!r}, but the '
                       f"tokenizer's EOS is {tokenizer.eos_token!r} (a Llama/Vicuna tokenizer "
                       'is needed; for a ChatML one use the chatml template)')


@dataclasses.dataclass(frozen=True)
class ChatML(Template):
  """SmolLM2's ChatML template (see the module doc)."""
  name: str = CHATML
  system: str = CHATML_SYSTEM
  force_bos: bool = False

  def _segments(self, turns) -> list[tuple[str, bool]]:
    """(text, learned) pieces of the prompt; the learned ones are `answer + <|im_end|>`."""
    turns = text.as_turns(turns)
    if not turns:
      raise ConversationError('empty conversation')
    head = f'{IM_START}system\n{self.system}{IM_END}\n'
    out = []
    for i, (human, gpt) in enumerate(turns):
      if not isinstance(human, str) or not human:
        raise ConversationError(f'turn {i}: the question must be a non-empty string, got '
                                f'{human!r}')
      for value in (human, gpt):
        for special in (IM_START, IM_END):
          if isinstance(value, str) and special in value:
            raise ConversationError(f'turn {i}: {value!r} contains the template token '
                                    f'{special!r}')
      head += f'{IM_START}user\n{human}{IM_END}\n{IM_START}assistant\n'
      if gpt is None:
        if i != len(turns) - 1:
          raise ConversationError(f'turn {i}: only the last turn may be unanswered '
                                  '(gpt=None)')
        out.append((head, False))
        return out
      if not isinstance(gpt, str) or not gpt:
        raise ConversationError(f'turn {i}: the answer must be a non-empty string (or None '
                                f'for the generation prompt), got {gpt!r}')
      out += [(head, False), (gpt + IM_END, True)]
      head = '\n'
    out.append((head, False))
    return out

  def prompt(self, turns: Conversation) -> str:
    return ''.join(s for s, _ in self._segments(turns))

  def _ids(self, tokenizer, segments) -> tuple[list[int], list[int], list[int]]:
    """Ids, labels and each segment's end in them: the segments tokenized one by one (split
    at `<image>`), one BOS kept at the start when the tokenizer adds one."""
    bos = text.adds_bos(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    ends: list[int] = []
    for k, (segment, learned) in enumerate(segments):
      piece = text.tokenizer_image_token(tokenizer, segment, bos=bos)
      if bos and k:
        piece = piece[1:]
      ids += piece
      labels += piece if learned else [IGNORE_INDEX] * len(piece)
      ends.append(len(ids))
    return ids, labels, ends

  def tokenize(self, tokenizer, turns, num_frames=8, on_mismatch='raise'):
    """ChatML ids and labels (see `Template.tokenize`).

    Labels are IGNORE_INDEX everywhere but on each answer's tokens and the `<|im_end|>` after
    it. `on_mismatch`: 'raise' (default) raises TokenizationMismatchError when an answer does
    not end on the `<|im_end|>` id or the image ids are not `num_frames`; 'mask' sets every
    label to IGNORE_INDEX with a warning instead.
    """
    if on_mismatch not in ('raise', 'mask'):
      raise ValueError(f"on_mismatch={on_mismatch!r}; expected 'raise' or 'mask'")
    turns = text.expand_placeholders(turns, num_frames)
    for i, (_, gpt) in enumerate(turns):
      if gpt is None:
        raise ConversationError(f'turn {i} has no answer; use generation_ids for a prompt '
                                'that ends with the assistant header')
    self.check(tokenizer)
    segments = self._segments(turns)
    ids, labels, ends = self._ids(tokenizer, segments)
    input_ids = np.asarray(ids, np.int32)
    labels = np.asarray(labels, np.int32)
    stop = self.stop_id(tokenizer)
    problems = []
    for (_, learned), end in zip(segments, ends):
      if learned and input_ids[end - 1] != stop:
        problems.append(f'an answer does not end on {IM_END!r} (id {stop})')
        break
    n_img = int(np.sum(input_ids == IMAGE_TOKEN_INDEX))
    if n_img != num_frames:
      problems.append(f'{n_img} image ids for num_frames={num_frames}')
    if problems:
      if on_mismatch == 'raise':
        raise text.TokenizationMismatchError('; '.join(problems))
      warnings.warn(f'tokenization mismatch: {"; ".join(problems)}; all labels ignored')
      labels[:] = IGNORE_INDEX
    return input_ids, labels

  def generation_ids(self, tokenizer, question, num_frames=8, history=()):
    """Prompt ids for decoding: the training ids of the same conversation up to and including
    `<|im_start|>assistant\\n` (video markers put in front of the first question when no turn
    has a placeholder). Decoding stops at `<|im_end|>`."""
    turns = text.as_turns(history) + [(question, None)]
    for i, (_, gpt) in enumerate(turns[:-1]):
      if gpt is None:
        raise ConversationError(f'history turn {i} has no answer')
    turns = text.expand_placeholders(turns, num_frames, insert_missing=True)
    self.check(tokenizer)
    return np.asarray(self._ids(tokenizer, self._segments(turns))[0], np.int32)

  def stop_id(self, tokenizer) -> int:
    i = tokenizer.convert_tokens_to_ids(IM_END)
    if i is None or (i == tokenizer.unk_token_id and tokenizer.unk_token != IM_END):
      raise ValueError(f'the tokenizer has no {IM_END!r} token; the chatml template needs '
                       f'{IM_START!r} and {IM_END!r} (SmolLM2-Instruct style)')
    return int(i)

  def check(self, tokenizer) -> None:
    bos = text.adds_bos(tokenizer)
    for special in (IM_START, IM_END):
      want = tokenizer.convert_tokens_to_ids(special)
      got = list(tokenizer(special).input_ids)[int(bos):]
      if got != [want] or want == tokenizer.unk_token_id:
        raise ValueError(f'the tokenizer writes {special!r} as {got}, not as one token; the '
                         f'chatml template needs {IM_START!r} and {IM_END!r} as special tokens')
    ids = list(tokenizer('a b').input_ids)
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
      raise ValueError(f'the tokenizer appends EOS ({tokenizer.eos_token_id}); the chatml '
                       f'template writes {IM_END!r} itself (set add_eos_token=False)')


def get(name: str, system: str | None = None) -> Template:
  """The template called `name` (one of NAMES); `system`: its system message (None: the
  template's own: `text.SYSTEM_PROMPTS[name]` for the Vicuna ones, CHATML_SYSTEM)."""
  if name in text.SYSTEM_PROMPTS:
    return Vicuna(name, text.SYSTEM_PROMPTS[name] if system is None else system)
  if name == CHATML:
    return ChatML(system=CHATML_SYSTEM if system is None else system)
  raise ValueError(f'unknown conversation template {name!r}; expected one of {list(NAMES)}')


def default_name(tokenizer: Any) -> str:
  """'chatml' for a tokenizer whose own chat template is ChatML (SmolLM2), else DEFAULT."""
  return CHATML if IM_START in str(getattr(tokenizer, 'chat_template', None) or '') else DEFAULT
