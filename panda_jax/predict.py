"""Asks a model one question about a video (or every video in a directory).

  python -m panda_jax.predict --checkpoint=DIR --video=FILE_OR_DIR --question="..." \\
      [--frames=4|8|16|32] [--json] [--tokenizer=DIR] [--max_new_tokens=1024]

`--checkpoint` is a converted release or a training workdir (as for `panda_jax.eval.videoqa`).
`--tokenizer` defaults to the checkpoint directory when it holds tokenizer files, else to a
training workdir's `data.tokenizer`.

The answer is printed as it is generated, token by token (greedy, as the VideoQA evaluation).
For a directory, its video files (by extension, sorted, not recursing) are answered one after
the other, each line starting with the file name; `--json` prints one JSON object per video,
`{"video", "question", "answer"}`, once its answer is complete. A video that is missing or
cannot be decoded, or a file in the directory without a video extension, gets a one-line
`error: <path>: <reason>` on stderr. Exit status: 1 if a single video failed; for a directory,
the failures are listed and the rest answered, and the status is 1 only when no video at all
could be answered (an empty directory included); 2 for bad flags.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, TextIO

import numpy as np

from panda_jax import storage
from panda_jax.data.pipeline import VIDEO_EXTENSIONS

FRAME_CHOICES = (4, 8, 16, 32)


def list_videos(path: str) -> tuple[list[str], list[tuple[str, str]]]:
  """-> (video files to answer, [(path, reason)] for files that cannot be). A file is taken as
  it is; a directory gives its files with a video extension, sorted (other files are listed
  as failures; hidden files and subdirectories are ignored)."""
  if os.path.isfile(path):
    return [path], []
  if not os.path.isdir(path):
    return [], [(path, 'no such file or directory')]
  videos, others = [], []
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if name.startswith('.') or not os.path.isfile(full):
      continue
    if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
      videos.append(full)
    else:
      others.append((full, f'not a video file (accepted extensions: '
                           f'{", ".join(VIDEO_EXTENSIONS)})'))
  return videos, others


def resolve_tokenizer(checkpoint: str, tokenizer: str | None) -> str:
  """The tokenizer directory: `tokenizer` if given, else the checkpoint directory when it holds
  tokenizer files, else a training workdir's `data.tokenizer`."""
  if tokenizer:
    return tokenizer
  if any(storage.isfile(storage.join(checkpoint, f)) for f in ('tokenizer.json',
                                                                'tokenizer.model')):
    return checkpoint
  from panda_jax.eval.predict import workdir_data_field
  found = workdir_data_field(checkpoint, 'tokenizer')
  if found:
    return found
  raise ValueError(f'no tokenizer found for {checkpoint} (no tokenizer.json / tokenizer.model '
                   'there, no data.tokenizer in its config.json); pass --tokenizer=DIR')


class TextStream:
  """Prints the text of sequence 0 of a batch as `generate` chooses its tokens.

  Pass the same instance to every call (it is a static argument of the compiled program) and
  call `start` before each. Text is re-decoded from all tokens so far and only the new part
  written, so pieces that merge (SentencePiece spaces, multi-byte characters) come out right.
  """

  def __init__(self, tokenizer, eos_id: int | None, out: TextIO = sys.stdout):
    self.tokenizer, self.eos_id, self.out = tokenizer, eos_id, out
    self.start()

  def start(self) -> None:
    self.ids: list[int] = []
    self.done = False
    self.shown = ''

  def __call__(self, step, tokens) -> None:
    tok = int(np.asarray(tokens)[0])
    if self.done or tok == self.eos_id:
      self.done = True
      return
    self.ids.append(tok)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
    if text.endswith('\ufffd'):          # an incomplete multi-byte character: wait for the rest
      return
    self.show(text)

  def show(self, text: str) -> None:
    """Writes what `text` adds to what is shown (when it extends it)."""
    if text.startswith(self.shown) and len(text) > len(self.shown):
      self.out.write(text[len(self.shown):])
      self.out.flush()
      self.shown = text

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def answer_videos(predictor, paths: list[str], question: str, frames: int = 8,
                  as_json: bool = False, prefix: bool = False, timeout_s: float = 60.0,
                  out: TextIO = sys.stdout,
                  report: Callable[[str, str], None] | None = None) -> int:
  """Answers `question` about each video in `paths`, printing to `out` (streamed, or JSON
  lines with `as_json`; `prefix` starts each streamed answer with the file name). Failures go
  to `report(path, reason)`. Returns the number of videos answered."""
  from panda_jax.data.video import VideoDecodeError
  from panda_jax.eval.videoqa import load_clip
  stream = None if as_json else TextStream(predictor.tokenizer, predictor.sampling.eos_id, out)
  answered = 0
  for path in paths:
    try:
      v = load_clip(path, predictor.cfg.stab, frames, timeout_s)
    except VideoDecodeError as e:
      report(path, e.reason)
      continue
    if stream is not None:
      stream.start()
      if prefix:
        out.write(f'{os.path.basename(path)}: ')
        out.flush()
    answer = predictor.answer(v['pixels'][None], v['mask'][None], [question], stream=stream)[0]
    if stream is not None:
      stream.show(answer)                # whatever the token-by-token text held back
      out.write('\n')
    else:
      out.write(json.dumps({'video': path, 'question': question, 'answer': answer}) + '\n')
    out.flush()
    answered += 1
  return answered


def main(argv):
  from absl import app, flags
  from panda_jax.eval.generate import Sampling
  from panda_jax.eval.predict import Predictor, load_text
  from panda_jax.eval.videoqa import load_model
  del argv
  f = flags.FLAGS
  for name in ('checkpoint', 'video', 'question'):
    if not getattr(f, name):
      raise app.UsageError(f'--{name} is required')
  if f.frames not in FRAME_CHOICES:
    raise app.UsageError(f'--frames={f.frames}; expected one of {FRAME_CHOICES}')

  def report(path, reason):
    print(f'error: {path}: {reason}', file=sys.stderr, flush=True)

  videos, failures = list_videos(f.video)
  for path, reason in failures:
    report(path, reason)
  if not videos:
    if os.path.isdir(f.video) and not failures:
      report(f.video, f'no video files (extensions {", ".join(VIDEO_EXTENSIONS)})')
    sys.exit(1)
  try:
    tok, template = load_text(resolve_tokenizer(f.checkpoint, f.tokenizer), f.template,
                              f.system_message, f.checkpoint)
    cfg, variables = load_model(f.checkpoint)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  predictor = Predictor(cfg, variables, tok, Sampling(max_new_tokens=f.max_new_tokens,
                                                      eos_id=template.stop_id(tok)),
                        template=template)
  answered = answer_videos(predictor, videos, f.question, f.frames, f.json,
                           prefix=os.path.isdir(f.video), timeout_s=f.timeout_s, report=report)
  if answered == 0:
    sys.exit(1)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('checkpoint', None, 'Converted checkpoint or training workdir.')
  flags.DEFINE_string('video', None, 'A video file, or a directory of them.')
  flags.DEFINE_string('question', None, 'The question.')
  flags.DEFINE_integer('frames', 8, f'Frames per video, one of {FRAME_CHOICES}.')
  flags.DEFINE_bool('json', False, 'One JSON object per video instead of streamed text.')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer directory (default: see the module doc).')
  flags.DEFINE_integer('max_new_tokens', 1024, 'Answer length limit (the reference: 1024).')
  flags.DEFINE_string('template', '', 'Conversation template: videopanda_v1, vicuna_v1 or '
                      'chatml; default: a training workdir\'s data.system_prompt, else chatml '
                      'for a tokenizer with a ChatML chat template, else videopanda_v1.')
  flags.DEFINE_string('system_message', None, 'Replaces the template\'s system message.')
  flags.DEFINE_float('timeout_s', 60.0, 'Per-video decoding time budget.')
  app.run(main)
