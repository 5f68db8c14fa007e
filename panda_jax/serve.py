"""An OpenAI-compatible chat server for one Video-Panda model.

  python -m panda_jax.serve --checkpoint=DIR [--tokenizer=DIR] [--host=127.0.0.1] \\
      [--port=8000] [--video_root=DIR] [--max_batch=8] [--max_queue=64] [--frames=8]

Endpoints (FastAPI on uvicorn):

* `GET /`: a web page (panda_jax/static/index.html): pick a video under `--video_root` or upload
  one, see the frames the model will read, chat about it with the answer streamed. It uses two
  extensions: `GET /v1/videos` (the video files under `--video_root`) and `POST /v1/frames`
  (`{"video_url", "frames"}` -> the sampled frames as small JPEG data URLs).
* `GET /health`: `{"status": "ok", ...}` and counters (requests, batches, the batch sizes run).
* `GET /v1/models`: the one model, named `--model_name` (default: the checkpoint's base name).
* `POST /v1/chat/completions`: OpenAI's request and response shapes. The first user message
  holds the video as a content part `{"type": "video_url", "video_url": {"url": URL}}` (vLLM's
  convention), URL a `data:video/...;base64,...` upload or a `file://` path inside
  `--video_root`; remote URLs are never fetched. Later turns are text (multi-turn: earlier
  assistant messages are the history). A `system` message replaces the template's system
  prompt. `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `stop`, `n=1`,
  `stream` (server-sent events in OpenAI's chunk format, ending `data: [DONE]`;
  `stream_options.include_usage` adds a usage chunk) and an extension `frames` (frames read
  from the video, default `--frames`). `max_tokens` defaults to min(256, `--max_tokens`);
  `temperature` > 0 samples (each distinct temperature / top_p compiles its own program).

How requests share the device: a request is checked, its video decoded in a thread pool off
the event loop, then queued. One worker owns the device: it takes up to `--max_batch` waiting
requests with the same frame count and sampling settings, pads the batch to a power of two
(rows repeat the first request) and `max_tokens` to a power of two (at least 16), so a few
compiled programs serve every batch, runs one batched `Predictor.generate_ids`, and hands
each request its tokens. Streamed answers get their text as each token is chosen (the
`generate` host callback runs per decoding step); text that may be the start of a `stop`
string, an incomplete character, or trailing spaces is held back until it is known. At most
`--max_queue` requests are admitted at once (decoding, waiting or generating); more get 429.

Errors use OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}` with a 4xx:
malformed JSON or fields (400), an unknown model (404), no video, an unsupported or
undecodable video, a path outside `--video_root` (400), too large a body (413, `--max_body_mb`),
too many frames (`--max_frames`), `max_tokens` over `--max_tokens` or too long a prompt
(`--max_prompt_tokens`) (400), a full queue (429).

`usage.prompt_tokens` counts the text tokens plus `frames * max_frame_tokens` visual slots
(the most the video can take); `completion_tokens` the tokens generated (without `</s>`).
"""

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any, Sequence

import numpy as np

FRAME_CHOICES = (4, 8, 16, 32)
VIDEO_MIME_SUFFIX = {'video/mp4': '.mp4', 'video/webm': '.webm', 'video/quicktime': '.mov',
                     'video/x-matroska': '.mkv', 'video/x-msvideo': '.avi', 'video/mpeg': '.mpg',
                     'video/ogg': '.ogv', 'video/3gpp': '.3gp'}
MIN_NEW_TOKENS_BUCKET = 16

log = logging.getLogger('panda_jax.serve')


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for (each refused with a message naming the limit)."""
  max_body_bytes: int = 64 << 20
  max_tokens: int = 1024
  max_prompt_tokens: int = 2048
  max_frames: int = 32
  max_stop: int = 4
  decode_timeout_s: float = 60.0


class ApiError(Exception):
  """An OpenAI-style error: HTTP `status`, `message`, `type`, `param`, `code`."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, type_: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                  code, type_)

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.type, 'param': self.param,
                      'code': self.code}}


# ---------------------------------------------------------------------------------------------
# Requests.


@dataclasses.dataclass
class Chat:
  """One parsed chat request."""
  question: str                                   # the last user message's text
  history: list[tuple[str, str]]                  # earlier (user, assistant) turns
  system: str | None
  video_url: str
  frames: int
  max_tokens: int
  temperature: float
  top_p: float
  stop: list[str]
  stream: bool
  include_usage: bool

  @property
  def key(self) -> tuple:
    """Requests with equal keys can share one batch."""
    return (self.frames, self.temperature, self.top_p if self.temperature else 1.0)


def _text_of(content: Any, where: str, allow_video: bool) -> tuple[str, str | None]:
  """A message's content (a string or a list of parts) -> (text, video URL or None)."""
  if isinstance(content, str):
    return content, None
  if not isinstance(content, list):
    raise ApiError(400, f'{where}.content must be a string or a list of content parts, got '
                   f'{type(content).__name__}', param=f'{where}.content')
  texts, video = [], None
  for j, part in enumerate(content):
    p = f'{where}.content[{j}]'
    kind = part.get('type') if isinstance(part, dict) else None
    if kind == 'text' and isinstance(part.get('text'), str):
      texts.append(part['text'])
    elif kind == 'video_url':
      url = part.get('video_url')
      url = url.get('url') if isinstance(url, dict) else url
      if not isinstance(url, str) or not url:
        raise ApiError(400, f'{p}.video_url.url must be a non-empty string', param=p)
      if not allow_video:
        raise ApiError(400, f'{p}: the video must be in the first user message (one video per '
                       'conversation)', param=p)
      if video is not None:
        raise ApiError(400, f'{p}: one video per conversation; this message has two', param=p)
      video = url
    else:
      raise ApiError(400, f'{p}: unsupported content part {str(part)[:80]!r}; accepted: '
                     '{"type": "text", "text": ...} and {"type": "video_url", "video_url": '
                     '{"url": ...}}', param=p)
  return '\n'.join(texts), video


def _number(body: dict, name: str, default, lo, hi, integer: bool = False):
  value = body.get(name)
  if value is None:
    return default
  ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
  if not ok or not lo <= value <= hi:
    kind = 'an integer' if integer else 'a number'
    raise ApiError(400, f'{name}={value!r}: expected {kind} in [{lo}, {hi}]', param=name)
  return value


def parse_chat(body: Any, model_name: str, limits: Limits, default_frames: int) -> Chat:
  """The JSON body of `POST /v1/chat/completions` -> `Chat` (raises ApiError)."""
  if not isinstance(body, dict):
    raise ApiError(400, f'the request body must be a JSON object, got {type(body).__name__}')
  model = body.get('model')
  if model != model_name:
    raise ApiError(404, f'model {model!r} does not exist; this server has {model_name!r}',
                   param='model', code='model_not_found')
  messages = body.get('messages')
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, 'messages must be a non-empty list', param='messages')
  system, turns, video = None, [], None
  for i, m in enumerate(messages):
    where = f'messages[{i}]'
    role = m.get('role') if isinstance(m, dict) else None
    if role not in ('system', 'developer', 'user', 'assistant'):
      raise ApiError(400, f'{where}.role={role!r}: expected system, user or assistant',
                     param=f'{where}.role')
    if role in ('system', 'developer'):
      if turns or system is not None:
        raise ApiError(400, f'{where}: a system message may only come first', param=where)
      system, _ = _text_of(m.get('content'), where, allow_video=False)
      continue
    expected = 'user' if len(turns) % 2 == 0 else 'assistant'
    if role != expected:
      raise ApiError(400, f'{where}.role={role!r}: expected {expected!r} (user and assistant '
                     'messages alternate, starting and ending with user)', param=f'{where}.role')
    text, url = _text_of(m.get('content'), where, allow_video=(role == 'user' and not turns))
    video = video or url
    turns.append(text)
  if len(turns) % 2 == 0:
    raise ApiError(400, 'the last message must be a user message', param='messages')
  if video is None:
    raise ApiError(400, 'no video: put one in the first user message as a content part '
                   '{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..." or '
                   '"file://..."}}', param='messages', code='no_video')
  n = _number(body, 'n', 1, 1, 1, integer=True)
  del n
  max_tokens = body.get('max_completion_tokens', body.get('max_tokens'))
  if max_tokens is None:
    max_tokens = min(limits.max_tokens, 256)
  elif (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or
        not 1 <= max_tokens <= limits.max_tokens):
    raise ApiError(400, f'max_tokens={max_tokens!r}: expected an integer in [1, '
                   f'{limits.max_tokens}] (the server\'s --max_tokens)', param='max_tokens')
  frames = _number(body, 'frames', default_frames, 1, 10**9, integer=True)
  if frames > limits.max_frames:
    raise ApiError(400, f'frames={frames}: too many frames (the server allows at most '
                   f'{limits.max_frames}, --max_frames)', param='frames')
  if frames not in FRAME_CHOICES:
    raise ApiError(400, f'frames={frames}: expected one of {FRAME_CHOICES}', param='frames')
  stop = body.get('stop')
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > limits.max_stop or
      not all(isinstance(s, str) and s for s in stop)):
    raise ApiError(400, f'stop={body.get("stop")!r}: expected a non-empty string or a list of '
                   f'at most {limits.max_stop}', param='stop')
  stream = body.get('stream', False)
  if not isinstance(stream, bool):
    raise ApiError(400, f'stream={stream!r}: expected true or false', param='stream')
  options = body.get('stream_options') or {}
  if not isinstance(options, dict):
    raise ApiError(400, f'stream_options={options!r}: expected an object',
                   param='stream_options')
  return Chat(question=turns[-1], history=list(zip(turns[:-1:2], turns[1::2])), system=system,
              video_url=video, frames=frames, max_tokens=max_tokens,
              temperature=float(_number(body, 'temperature', 0.0, 0.0, 2.0)),
              top_p=float(_number(body, 'top_p', 1.0, 1e-6, 1.0)), stop=stop, stream=stream,
              include_usage=bool(options.get('include_usage')))


# ---------------------------------------------------------------------------------------------
# Videos.


def open_video(url: str, video_root: str | None, tmp_dir: str) -> tuple[str, bool]:
  """A request's video URL -> (local file, whether it is a temporary copy to delete).

  `data:video/...;base64,` URLs are written to `tmp_dir`; `file://` paths must resolve inside
  `video_root`. Anything else (http(s):// included: nothing remote is fetched) is refused."""
  if url.startswith('data:'):
    head, sep, payload = url.partition(',')
    mime = head[5:].split(';')[0].lower()
    if not sep or not head.endswith(';base64'):
      raise ApiError(400, 'a data URL video must be base64: data:video/mp4;base64,...',
                     param='video_url')
    if not mime.startswith('video/'):
      raise ApiError(400, f'unsupported video type {mime!r}: expected video/* (e.g. '
                     f'{", ".join(VIDEO_MIME_SUFFIX)})', param='video_url',
                     code='unsupported_video')
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
      raise ApiError(400, f'the video data URL is not valid base64 ({e})',
                     param='video_url') from None
    fd, path = tempfile.mkstemp(suffix=VIDEO_MIME_SUFFIX.get(mime, '.bin'), dir=tmp_dir)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return path, True
  if url.startswith('file://'):
    if not video_root:
      raise ApiError(400, 'file:// videos are off: the server was started without '
                     '--video_root; upload the video as a data: URL', param='video_url')
    path = os.path.realpath(url[len('file://'):])
    root = os.path.realpath(video_root)
    if os.path.commonpath([root, path]) != root:
      raise ApiError(400, f'{url}: the path is outside the server\'s video root {root}',
                     param='video_url', code='path_not_allowed')
    if not os.path.isfile(path):
      raise ApiError(400, f'{url}: no such video file', param='video_url')
    return path, False
  scheme = url.split(':', 1)[0] if ':' in url else url[:20]
  raise ApiError(400, f'unsupported video URL scheme {scheme!r}: expected a data:video/...;base64 '
                 'upload or a file:// path inside --video_root (remote URLs are not fetched)',
                 param='video_url')


def list_videos(root: str, limit: int = 1000) -> list[str]:
  """Video files under `root` (by extension, relative paths, sorted; at most `limit`)."""
  from panda_jax.data.pipeline import VIDEO_EXTENSIONS
  found = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if not x.startswith('.'))
    rel = os.path.relpath(d, root)
    found += [os.path.normpath(os.path.join(rel, f)) for f in sorted(files)
              if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS and not f.startswith('.')]
    if len(found) >= limit:
      break
  return sorted(found)[:limit]


# ---------------------------------------------------------------------------------------------
# The device worker.


def _round_up_pow2(n: int, lo: int = 1) -> int:
  return max(lo, 1 << (max(n, 1) - 1).bit_length())


class TextTracker:
  """The text of one answer as its tokens arrive: what may be shown so far, and the stop.

  Text is re-decoded from all tokens (pieces that merge come out right); text that may be the
  start of a stop string, an incomplete character or trailing whitespace is held back."""

  def __init__(self, tokenizer, stop: Sequence[str], max_tokens: int):
    self.tokenizer, self.stop, self.max_tokens = tokenizer, list(stop), max_tokens
    self.ids: list[int] = []
    self.shown = ''
    self.stopped = False

  def text(self) -> str:
    return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()

  def cut(self, text: str) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
    return (text[:at].rstrip(), True) if at >= 0 else (text, False)

  def add(self, token: int) -> str:
    """Takes one token; returns the new text that can be shown."""
    if self.stopped or len(self.ids) >= self.max_tokens:
      return ''
    self.ids.append(token)
    text, self.stopped = self.cut(self.text())
    if not self.stopped:
      if text.endswith('\ufffd'):
        return ''
      for s in self.stop:          # a stop string may be starting at the end
        for k in range(min(len(s) - 1, len(text)), 0, -1):
          if text.endswith(s[:k]):
            text = text[:-k]
            break
    return self._extend(text.rstrip())

  def _extend(self, text: str) -> str:
    if text.startswith(self.shown) and len(text) > len(self.shown):
      new, self.shown = text[len(self.shown):], text
      return new
    return ''

  def finish(self, ids: Sequence[int]) -> tuple[str, str, str, int]:
    """The final token ids -> (answer, text not yet shown, finish_reason, completion tokens)."""
    ids = [int(i) for i in ids[:self.max_tokens]]
    full = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
    answer, stopped = self.cut(full)
    reason = 'stop' if stopped or len(ids) < self.max_tokens else 'length'
    return answer, self._extend(answer), reason, len(ids)


@dataclasses.dataclass(eq=False)
class Job:
  """A request waiting for the device (built on the event loop, resolved by the worker)."""
  chat: Chat
  prompt: Any                      # the Predictor's question (str or _Conversation)
  prompt_tokens: int
  pixels: np.ndarray
  mask: np.ndarray
  future: asyncio.Future
  events: asyncio.Queue | None     # streamed text pieces, None at the end
  tracker: TextTracker


@dataclasses.dataclass(frozen=True)
class _Conversation:
  """A multi-turn (or custom system prompt) question for `Engine.prompt_ids`."""
  question: str
  history: tuple
  system: str | None


class _Steps:
  """The `stream` callback of `generate`: hands each step's tokens to the batch's requests.

  One instance for the server's life (it is a static argument of the compiled program)."""

  def __init__(self, eos_id: int | None):
    self.eos_id = eos_id
    self.jobs: list[Job] = []
    self.loop: asyncio.AbstractEventLoop | None = None

  def __call__(self, step, tokens) -> None:
    tokens = np.asarray(tokens)
    for job, tok in zip(self.jobs, tokens):
      if job.events is None or job.tracker.stopped:
        continue
      if job.tracker.max_tokens <= len(job.tracker.ids) or int(tok) == self.eos_id:
        job.tracker.stopped = True
        continue
      piece = job.tracker.add(int(tok))
      if piece:
        self.loop.call_soon_threadsafe(job.events.put_nowait, piece)

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


class Engine:
  """One model on the device, a queue of requests and the worker that batches them."""

  def __init__(self, predictor, limits: Limits, max_batch: int = 8, max_queue: int = 64,
               video_root: str | None = None, decode_workers: int = 4,
               model_name: str = 'video-panda', frames: int = 8):
    if max_batch < 1 or max_queue < 1:
      raise ValueError(f'max_batch={max_batch} and max_queue={max_queue} must be at least 1')
    if frames not in FRAME_CHOICES:
      raise ValueError(f'frames={frames}: expected one of {FRAME_CHOICES}')
    self.predictor, self.limits = predictor, limits
    self.max_batch, self.max_queue = max_batch, max_queue
    self.video_root, self.model_name, self.frames = video_root, model_name, frames
    self.decoders = concurrent.futures.ThreadPoolExecutor(decode_workers,
                                                          thread_name_prefix='decode')
    self.device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='device')
    self.tmp = tempfile.TemporaryDirectory(prefix='panda-serve-')
    self.admitted = 0
    self.waiting: list[Job] = []
    self.wake: asyncio.Event | None = None
    self.steps = _Steps(predictor.sampling.eos_id)
    self.stats = {'requests': 0, 'answered': 0, 'batches': 0, 'batch_sizes': {},
                  'rejected_busy': 0}
    # The Predictor builds the prompt of each question it is given (its template and stop
    # token); ours may also be a `_Conversation`, which `prompt_ids` below understands.
    self._predictor_prompt_ids = predictor.prompt_ids
    predictor.prompt_ids = self.prompt_ids

  # -- prompt

  def prompt_ids(self, question, frames: int) -> np.ndarray:
    """The Predictor's prompt for a plain question; multi-turn conversations and custom system
    prompts through the Predictor's conversation template with the history."""
    if not isinstance(question, _Conversation):
      return self._predictor_prompt_ids(question, frames)
    # The Predictor's template (its tokens and stop id), with the request's system message.
    from panda_jax.data import templates
    template = self.predictor.template
    if question.system is not None:
      template = templates.get(template.name, question.system)
    return template.generation_ids(self.predictor.tokenizer, question.question,
                                   num_frames=frames, history=question.history)

  # -- admission (event loop)

  def admit(self) -> None:
    if self.admitted >= self.max_queue:
      self.stats['rejected_busy'] += 1
      raise ApiError(429, f'the server is busy: {self.admitted} requests are queued (the limit '
                     f'is --max_queue={self.max_queue}); retry later', type_='rate_limit_error',
                     code='queue_full')
    self.admitted += 1
    self.stats['requests'] += 1

  def release(self) -> None:
    self.admitted -= 1

  @contextlib.contextmanager
  def _video(self, url: str):
    """The local path of the request's video (a temporary file for an upload, removed after);
    a decoding failure inside becomes the 400 that names its reason."""
    from panda_jax.data.video import VideoDecodeError
    path, temporary = open_video(url, self.video_root, self.tmp.name)
    try:
      yield path
    except VideoDecodeError as e:
      raise ApiError(400, f'the video cannot be decoded: {e.reason}', param='video_url',
                     code='invalid_video') from None
    finally:
      if temporary:
        os.unlink(path)

  def load(self, chat: Chat) -> dict:
    """Opens and decodes the request's video (in a decoding thread)."""
    from panda_jax.eval.videoqa import load_clip
    with self._video(chat.video_url) as path:
      return load_clip(path, self.predictor.cfg.stab, chat.frames, self.limits.decode_timeout_s)

  def thumbnails(self, url: str, frames: int, height: int = 96) -> list[str]:
    """The frames the model reads of the video at `url` (the same sampling), as JPEG data
    URLs `height` pixels high (in a decoding thread)."""
    import io
    from PIL import Image
    from panda_jax.data.video import decode_frames
    with self._video(url) as path:
      images, _ = decode_frames(path, num=frames, timeout_s=self.limits.decode_timeout_s)
    out = []
    for frame in images:
      image = Image.fromarray(frame)
      image = image.resize((max(1, round(image.width * height / image.height)), height))
      buf = io.BytesIO()
      image.save(buf, format='JPEG', quality=80)
      out.append('data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode())
    return out

  async def submit(self, chat: Chat) -> Job:
    """Checks the prompt, decodes the video off the loop and queues the request."""
    from panda_jax.data import text
    loop = asyncio.get_running_loop()
    if chat.history or chat.system is not None:
      prompt = _Conversation(chat.question, tuple(chat.history), chat.system)
    else:
      prompt = chat.question
    try:
      ids = self.prompt_ids(prompt, chat.frames)
    except text.ConversationError as e:     # the request's conversation; anything else is ours
      raise ApiError(400, f'the conversation cannot be built: {e}', param='messages') from None
    text_tokens = len(ids) - chat.frames
    if text_tokens > self.limits.max_prompt_tokens:
      raise ApiError(400, f'the prompt has {text_tokens} text tokens; the server allows at most '
                     f'{self.limits.max_prompt_tokens} (--max_prompt_tokens)', param='messages',
                     code='context_length_exceeded')
    clip = await loop.run_in_executor(self.decoders, self.load, chat)
    job = Job(chat, prompt, text_tokens + chat.frames * self.predictor.cfg.stab.max_frame_tokens,
              clip['pixels'], clip['mask'], loop.create_future(),
              asyncio.Queue() if chat.stream else None,
              TextTracker(self.predictor.tokenizer, chat.stop, chat.max_tokens))
    self.waiting.append(job)
    self.wake.set()
    return job

  # -- the worker (one task; the device work in its one thread)

  def start(self) -> None:
    self.wake = asyncio.Event()
    self.steps.loop = asyncio.get_running_loop()
    self.task = asyncio.get_running_loop().create_task(self._work())
    self.task.add_done_callback(
        lambda t: t.cancelled() or log.error('the device worker stopped: %r', t.exception()))

  def take(self) -> list[Job]:
    """Up to `max_batch` waiting jobs that can share a batch with the oldest, oldest first."""
    key = self.waiting[0].chat.key
    batch = [j for j in self.waiting if j.chat.key == key][:self.max_batch]
    taken = {id(j) for j in batch}
    self.waiting = [j for j in self.waiting if id(j) not in taken]
    return batch

  async def _work(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      if not self.waiting:
        self.wake.clear()
        await self.wake.wait()
        continue
      batch = self.take()
      self.stats['batches'] += 1
      sizes = self.stats['batch_sizes']
      sizes[len(batch)] = sizes.get(len(batch), 0) + 1
      log.info('batch of %d request(s) (%d waiting)', len(batch), len(self.waiting))
      try:
        results = await loop.run_in_executor(self.device, self._run, batch)
      except Exception as e:  # noqa: BLE001  (every request of the batch hears of it)
        log.exception('batch failed')
        error = ApiError(500, f'generation failed: {e}', type_='server_error')
        for job in batch:
          self._finish(job, error=error)
        continue
      for job, ids in zip(batch, results):
        self._finish(job, ids)

  def _finish(self, job: Job, ids=None, error: Exception | None = None) -> None:
    """Resolves a job and frees its place in the queue (whether or not anyone listens)."""
    self.release()
    if not job.future.done():
      if error is None:
        job.future.set_result(ids)
      else:
        job.future.set_exception(error)
    if job.events is not None:
      job.events.put_nowait(None)

  def _run(self, batch: list[Job]) -> list[np.ndarray]:
    """One batched generation (device thread): pads to the compiled bucket sizes."""
    p = self.predictor
    b = _round_up_pow2(len(batch))
    rows = batch + [batch[0]] * (b - len(batch))
    chat = batch[0].chat
    n = min(_round_up_pow2(max(j.chat.max_tokens for j in batch), MIN_NEW_TOKENS_BUCKET),
            _round_up_pow2(self.limits.max_tokens, MIN_NEW_TOKENS_BUCKET))
    p.sampling = dataclasses.replace(p.sampling, max_new_tokens=n,
                                     temperature=chat.temperature, top_p=chat.top_p)
    pixels = np.stack([j.pixels for j in rows])
    mask = np.stack([j.mask for j in rows])
    self.steps.jobs = [j for j in batch]
    import jax
    rng = jax.random.PRNGKey(time.time_ns() % (2**31)) if chat.temperature else None
    started = time.monotonic()
    stream = self.steps if any(j.events is not None for j in batch) else None
    try:
      ids = p.generate_ids(pixels, mask, [j.prompt for j in rows], rng=rng, stream=stream)
    finally:
      self.steps.jobs = []
    log.info('batch %d (padded to %d, max_new_tokens %d) in %.2f s', len(batch), b, n,
             time.monotonic() - started)
    return ids[:len(batch)]


# ---------------------------------------------------------------------------------------------
# The web app.


def create_app(engine: Engine):
  """The FastAPI app serving `engine`."""
  from fastapi import FastAPI, Request
  from fastapi.responses import FileResponse, JSONResponse
  from fastapi.sse import EventSourceResponse, format_sse_event
  from starlette.exceptions import HTTPException as StarletteHTTPException

  app = FastAPI(title='panda-jax', lifespan=_lifespan(engine))

  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, e):
    code = {404: 'not_found', 405: 'method_not_allowed', 413: 'body_too_large'}.get(e.status_code)
    return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(),
                        status_code=e.status_code)

  @app.get('/health')
  async def health():
    if engine.task.done():
      return JSONResponse({'status': 'the device worker stopped'}, status_code=503)
    return {'status': 'ok', 'model': engine.model_name, 'admitted': engine.admitted,
            'waiting': len(engine.waiting), **engine.stats}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': engine.model_name, 'object': 'model',
                                        'created': engine.created, 'owned_by': 'panda-jax'}]}

  @app.get('/')
  async def page():
    return FileResponse(os.path.join(os.path.dirname(__file__), 'static', 'index.html'))

  @app.get('/v1/videos')
  async def videos():
    """The page's extension: the video files under `--video_root` (as file:// names)."""
    names = []
    if engine.video_root:
      names = await asyncio.get_running_loop().run_in_executor(
          engine.decoders, list_videos, engine.video_root)
    root = os.path.realpath(engine.video_root) if engine.video_root else ''
    return {'root_url': f'file://{root}/', 'videos': names, 'frames': engine.frames}

  @app.post('/v1/frames')
  async def frames(request: Request):
    """The page's extension: the frames the model reads of `{"video_url", "frames"}`, as small
    JPEG data URLs."""
    body = await _read_body(request, engine.limits.max_body_bytes)
    try:
      body = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f'the request body is not valid JSON: {e}') from None
    if not isinstance(body, dict) or not isinstance(body.get('video_url'), str):
      raise ApiError(400, 'expected {"video_url": URL, "frames": N}', param='video_url')
    n = _number(body, 'frames', engine.frames, 1, engine.limits.max_frames, integer=True)
    if n not in FRAME_CHOICES:
      raise ApiError(400, f'frames={n}: expected one of {FRAME_CHOICES}', param='frames')
    images = await asyncio.get_running_loop().run_in_executor(
        engine.decoders, engine.thumbnails, body['video_url'], n)
    return {'frames': images}

  @app.post('/v1/chat/completions')
  async def chat_completions(request: Request):
    body = await _read_body(request, engine.limits.max_body_bytes)
    try:
      body = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f'the request body is not valid JSON: {e}') from None
    chat = parse_chat(body, engine.model_name, engine.limits, engine.frames)
    engine.admit()                 # released when its generation ends (Engine._finish)
    try:
      job = await engine.submit(chat)
    except BaseException:          # refused, or the client went away while it was decoded
      engine.release()
      raise
    rid = f'chatcmpl-{uuid.uuid4().hex}'
    created = int(time.time())
    if not chat.stream:
      ids = await job.future
      answer, _, reason, n = job.tracker.finish(ids)
      engine.stats['answered'] += 1
      return {'id': rid, 'object': 'chat.completion', 'created': created,
              'model': engine.model_name,
              'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': answer},
                           'logprobs': None, 'finish_reason': reason}],
              'usage': _usage(job.prompt_tokens, n)}

    def chunk(delta, reason=None, usage=False, n=0):
      out = {'id': rid, 'object': 'chat.completion.chunk', 'created': created,
             'model': engine.model_name,
             'choices': [] if usage else [{'index': 0, 'delta': delta, 'logprobs': None,
                                          'finish_reason': reason}]}
      if usage:
        out['usage'] = _usage(job.prompt_tokens, n)
      return format_sse_event(data_str=json.dumps(out))

    async def events():
      yield chunk({'role': 'assistant', 'content': ''})
      while (piece := await job.events.get()) is not None:
        yield chunk({'content': piece})
      try:
        ids = await job.future
      except ApiError as e:
        yield format_sse_event(data_str=json.dumps(e.body()))
        return
      _, rest, reason, n = job.tracker.finish(ids)
      if rest:
        yield chunk({'content': rest})
      yield chunk({}, reason)
      if chat.include_usage:
        yield chunk(None, usage=True, n=n)
      yield format_sse_event(data_str='[DONE]')
      engine.stats['answered'] += 1

    return EventSourceResponse(events())

  return app


def _usage(prompt: int, completion: int) -> dict:
  return {'prompt_tokens': prompt, 'completion_tokens': completion,
          'total_tokens': prompt + completion}


async def _read_body(request, limit: int) -> bytes:
  """The request body, refused with 413 past `limit` bytes (by Content-Length or as read)."""
  def too_large(size):
    return ApiError(413, f'the request body is {size} bytes; the server accepts at most {limit} '
                    '(--max_body_mb)', code='body_too_large')
  declared = request.headers.get('content-length')
  if declared and declared.isdigit() and int(declared) > limit:
    raise too_large(int(declared))
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise too_large(f'over {size}')
    chunks.append(chunk)
  return b''.join(chunks)


def _lifespan(engine: Engine):
  import contextlib

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine.created = int(time.time())
    engine.start()
    yield
    engine.task.cancel()
    engine.decoders.shutdown(wait=False, cancel_futures=True)
    engine.device.shutdown(wait=False, cancel_futures=True)
    engine.tmp.cleanup()

  return lifespan


def main(argv):
  from absl import app, flags
  from panda_jax.eval.generate import Sampling
  from panda_jax.eval.predict import Predictor, load_text
  from panda_jax.eval.videoqa import load_model
  from panda_jax.predict import resolve_tokenizer
  del argv
  f = flags.FLAGS
  if not f.checkpoint:
    raise app.UsageError('--checkpoint is required')
  if f.video_root and not os.path.isdir(f.video_root):
    raise app.UsageError(f'--video_root={f.video_root} is not a directory')
  limits = Limits(max_body_bytes=int(f.max_body_mb * (1 << 20)), max_tokens=f.max_tokens,
                  max_prompt_tokens=f.max_prompt_tokens, max_frames=f.max_frames,
                  decode_timeout_s=f.decode_timeout_s)
  try:
    tok, template = load_text(resolve_tokenizer(f.checkpoint, f.tokenizer), f.template,
                              f.system_message, f.checkpoint)
  except ValueError as e:
    raise app.UsageError(str(e))
  cfg, variables = load_model(f.checkpoint)
  predictor = Predictor(cfg, variables, tok, Sampling(max_new_tokens=MIN_NEW_TOKENS_BUCKET,
                                                      eos_id=template.stop_id(tok)),
                        template=template)
  name = f.model_name or os.path.basename(f.checkpoint.rstrip('/')) or 'video-panda'
  try:
    engine = Engine(predictor, limits, max_batch=f.max_batch, max_queue=f.max_queue,
                    video_root=f.video_root, decode_workers=f.decode_workers, model_name=name,
                    frames=f.frames)
  except ValueError as e:
    raise app.UsageError(str(e))
  import uvicorn
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
  log.info('serving %s on http://%s:%d', name, f.host, f.port)
  uvicorn.run(create_app(engine), host=f.host, port=f.port, log_level=f.log_level)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('checkpoint', None, 'Converted checkpoint or training workdir.')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer directory (default: as panda_jax.predict).')
  flags.DEFINE_string('template', '', 'Conversation template: videopanda_v1, vicuna_v1 or '
                      'chatml (default: as panda_jax.predict).')
  flags.DEFINE_string('system_message', None, 'Replaces the template\'s system message.')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind (loopback unless told otherwise).')
  flags.DEFINE_integer('port', 8000, 'Port.')
  flags.DEFINE_string('video_root', None, 'file:// videos must lie under this directory '
                      '(without it, only data: uploads).')
  flags.DEFINE_string('model_name', None, 'The model id (default: the checkpoint base name).')
  flags.DEFINE_integer('max_batch', 8, 'Most requests in one batched generation.')
  flags.DEFINE_integer('max_queue', 64, 'Most requests admitted at once; more get 429.')
  flags.DEFINE_integer('frames', 8, f'Default frames per video, one of {FRAME_CHOICES}.')
  flags.DEFINE_integer('max_frames', 32, 'Most frames a request may ask for.')
  flags.DEFINE_integer('max_tokens', 1024, 'Most new tokens a request may ask for.')
  flags.DEFINE_integer('max_prompt_tokens', 2048, 'Most text tokens in a prompt.')
  flags.DEFINE_float('max_body_mb', 64.0, 'Largest request body (uploads), in MiB.')
  flags.DEFINE_float('decode_timeout_s', 60.0, 'Per-video decoding time budget.')
  flags.DEFINE_integer('decode_workers', 4, 'Video decoding threads.')
  flags.DEFINE_string('log_level', 'info', 'uvicorn log level.')
  app.run(main)
