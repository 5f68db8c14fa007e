"""Serving throughput: requests/s and p50/p99 latency of `panda_jax.serve` at 1, 4 and 16
concurrent clients, against `predict`-style one-at-a-time answering of the same questions.

The server (`python -m panda_jax.serve --checkpoint=...`, a subprocess on a free loopback port)
is driven by the `openai` client (`AsyncOpenAI`) from this process: C clients each send their
next request as soon as their last one is answered, --requests requests in all, each a held-out
video (a `file://` URL under --video_root) and its question, greedy, `max_tokens` =
--max_new_tokens. The baseline is what `python -m panda_jax.predict` does: in this process, a
`Predictor` on the same checkpoint answers the same requests one after another (decode the
video, `Predictor.answer` on a batch of one), with the same frames, greedy, the same
max_new_tokens and end-of-turn stop. Both sides include video decoding; the server's latency
also includes HTTP and JSON, and its batching (up to --max_batch requests of one frame count,
padded to a power of two).

Every program each side needs is compiled by an untimed warm-up (the baseline: one pass over
the distinct prompts; the server: passes at b clients until it has run a batch of each padded
size b, the powers of two up to min(largest concurrency, --max_batch)), then
the timed passes run: baseline, each concurrency, baseline again (the baseline's figure is the
better of its two passes, so a busy neighbour does not flatter the server). Latency is wall
time from sending a request to holding its whole answer; requests/s = --requests / the wall
time of the pass. Only one side runs at a time (the idle server takes no CPU); the client runs
in this process and shares the host's cores with the server.

The requests come from --questions (a VideoQA question file: `video_name`/`video` and
`question` fields, as the demo's `data/eval_qa.json`) with videos under --video_root; by default
both come from the smoke demo's workdir (`python -m panda_jax.main --config=configs/demo.py:smoke
--workdir=/tmp/smoke_demo`, whose stage-3 workdir is the default --checkpoint).

Run from the repo root:
  python benchmarks/serve.py                                   # the smoke demo, 1, 4, 16 clients
  python benchmarks/serve.py --checkpoint=/tmp/demo/stage3 --video_root=/tmp/demo/data/videos \
      --questions=/tmp/demo/data/eval_qa.json --requests 64 --max_new_tokens 16
The last line is `RESULT baseline_rps=<x> rps_c1=<..> rps_c4=<..> rps_c16=<..>
speedup_c16=<rps_c16 / baseline_rps>` (one `rps_cN` per concurrency; `speedup_` of the largest).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEMO = '/tmp/smoke_demo'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def percentile(xs, q: float) -> float:
  """The q-th percentile (0-100) of xs, linear between closest ranks."""
  xs = sorted(xs)
  if len(xs) == 1:
    return xs[0]
  k = (len(xs) - 1) * q / 100
  lo = int(k)
  hi = min(lo + 1, len(xs) - 1)
  return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load_requests(questions: str, video_root: str, n: int) -> list[tuple[str, str]]:
  """n (video path, question) pairs, cycling through the question file's records."""
  from panda_jax.data import qa
  records = qa.qa_records(qa.load_qa(questions), video_root)
  pairs = []
  for r in records:
    path = os.path.abspath(os.path.join(video_root, r['video']))
    if os.path.exists(path):
      pairs.append((path, r['question']))
  if not pairs:
    raise SystemExit(f'no question of {questions} has its video under {video_root}')
  return [pairs[i % len(pairs)] for i in range(n)]


def start_server(args, port: int, log_path: str) -> subprocess.Popen:
  cmd = [sys.executable, '-m', 'panda_jax.serve', f'--checkpoint={args.checkpoint}',
         f'--port={port}', f'--video_root={args.video_root}', f'--frames={args.frames}',
         f'--max_batch={args.max_batch}', f'--max_queue={max(64, 2 * max(args.concurrency))}',
         '--model_name=bench', '--log_level=warning']
  if args.tokenizer:
    cmd.append(f'--tokenizer={args.tokenizer}')
  with open(log_path, 'w') as out:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 300
  while True:
    try:
      with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=5):
        return proc
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise SystemExit('the server did not start:\n' + open(log_path).read()[-3000:])
      time.sleep(0.5)


async def serve_pass(url: str, requests, concurrency: int, max_tokens: int):
  """(wall seconds, [latency seconds], [answers]) of the requests sent by `concurrency`
  clients."""
  import openai
  client = openai.AsyncOpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0,
                              timeout=600)
  latencies, answers = [0.0] * len(requests), [None] * len(requests)
  todo = iter(range(len(requests)))

  async def worker():
    for i in todo:
      path, question = requests[i]
      t0 = time.perf_counter()
      r = await client.chat.completions.create(
          model='bench', max_tokens=max_tokens, temperature=0, messages=[{
              'role': 'user', 'content': [
                  {'type': 'video_url', 'video_url': {'url': f'file://{path}'}},
                  {'type': 'text', 'text': question}]}])
      latencies[i] = time.perf_counter() - t0
      answers[i] = r.choices[0].message.content

  t0 = time.perf_counter()
  await asyncio.gather(*[worker() for _ in range(concurrency)])
  wall = time.perf_counter() - t0
  await client.close()
  return wall, latencies, answers


def health(url: str) -> dict:
  with urllib.request.urlopen(f'{url}/health', timeout=10) as r:
    return json.loads(r.read())


def warm_up(url: str, requests, args, compiled_sizes: set) -> set:
  """Compiles the server's program for each padded batch size the timed passes can form (the
  powers of two up to min(largest concurrency, --max_batch)): passes of 3 b requests at b
  clients, repeated (at most 4 rounds) until the server has run a batch of each size; -> the
  sizes never formed."""
  top = min(max(args.concurrency), args.max_batch)
  want = {1 << i for i in range(top.bit_length()) if 1 << i <= top}
  for _ in range(4):
    for b in sorted(want - compiled_sizes) or sorted(want):
      asyncio.run(serve_pass(url, (requests * 3)[:3 * b], b, args.max_new_tokens))
    for k in health(url)['batch_sizes']:
      compiled_sizes.add(1 << (int(k) - 1).bit_length())
    if want <= compiled_sizes:
      break
  return want - compiled_sizes


def baseline_pass(predictor, stab, requests, frames: int):
  """(wall seconds, [latency seconds], [answers]) of answering one request at a time."""
  from panda_jax.eval.videoqa import load_clip
  latencies, answers = [], []
  t0 = time.perf_counter()
  for path, question in requests:
    s = time.perf_counter()
    v = load_clip(path, stab, frames)
    answers.append(predictor.answer(v['pixels'][None], v['mask'][None], [question])[0])
    latencies.append(time.perf_counter() - s)
  return time.perf_counter() - t0, latencies, answers


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--checkpoint', default=f'{DEMO}/stage3',
                  help='converted checkpoint or training workdir (default: the smoke demo\'s)')
  ap.add_argument('--tokenizer', default=None, help='tokenizer directory (default: as predict)')
  ap.add_argument('--video_root', default=f'{DEMO}/data/videos', help='the videos')
  ap.add_argument('--questions', default=f'{DEMO}/data/eval_qa.json',
                  help='VideoQA question file naming videos under --video_root')
  ap.add_argument('--concurrency', default='1,4,16', help='comma-separated client counts')
  ap.add_argument('--requests', type=int, default=128, help='requests per timed pass')
  ap.add_argument('--max_new_tokens', type=int, default=16,
                  help='answer length limit (the server rounds it up to a power of two >= 16)')
  ap.add_argument('--frames', type=int, default=8, help='frames per video')
  ap.add_argument('--max_batch', type=int, default=16, help='the server\'s --max_batch')
  args = ap.parse_args()
  args.concurrency = [int(c) for c in args.concurrency.split(',')]
  for name in ('checkpoint', 'video_root', 'questions'):
    if not os.path.exists(getattr(args, name)):
      ap.error(f'--{name}={getattr(args, name)} does not exist (for the defaults, run '
               f'`python -m panda_jax.main --config=configs/demo.py:smoke --workdir={DEMO}`)')

  import jax
  from panda_jax.eval.generate import Sampling
  from panda_jax.eval.predict import Predictor, load_text
  from panda_jax.eval.videoqa import load_model
  from panda_jax.predict import resolve_tokenizer

  requests = load_requests(args.questions, args.video_root, args.requests)
  tok, template = load_text(resolve_tokenizer(args.checkpoint, args.tokenizer), '', None,
                            args.checkpoint)
  cfg, variables = load_model(args.checkpoint)
  predictor = Predictor(cfg, variables, tok, Sampling(max_new_tokens=args.max_new_tokens,
                                                      eos_id=template.stop_id(tok)),
                        template=template)
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'{os.cpu_count()} CPU cores')
  print(f'checkpoint: {args.checkpoint}; {len(requests)} requests per pass '
        f'({len(set(requests))} distinct), {args.frames} frames, greedy, max_new_tokens='
        f'{args.max_new_tokens}, server --max_batch={args.max_batch}')

  log_dir = tempfile.mkdtemp(prefix='bench_serve_')
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  server = start_server(args, port, os.path.join(log_dir, 'server.log'))
  try:
    distinct = list(dict.fromkeys(requests))
    baseline_pass(predictor, cfg.stab, distinct, args.frames)           # compile
    missing = warm_up(url, requests, args, compiled_sizes=set())
    if missing:
      print(f'warning: batch sizes {sorted(missing)} never formed in the warm-up; their first '
            'timed batch compiles')

    base = [baseline_pass(predictor, cfg.stab, requests, args.frames)]
    rows = {}
    for c in args.concurrency:
      rows[c] = asyncio.run(serve_pass(url, requests, c, args.max_new_tokens))
    base.append(baseline_pass(predictor, cfg.stab, requests, args.frames))
    served = health(url)
  finally:
    server.terminate()
    try:
      server.wait(30)
    except subprocess.TimeoutExpired:
      server.kill()

  best = min(base, key=lambda b: b[0])
  base_rps = len(requests) / best[0]
  agree = {c: sum(a == b for a, b in zip(rows[c][2], best[2])) for c in rows}
  print()
  print(f'{"path":<28} {"req/s":>8} {"x baseline":>10} {"p50 s":>8} {"p99 s":>8} '
        f'{"same answer":>11}')
  print(f'{"predict, one at a time":<28} {base_rps:>8.2f} {1.0:>10.2f} '
        f'{statistics.median(best[1]):>8.3f} {percentile(best[1], 99):>8.3f} {"-":>11}')
  for c, (wall, lat, _) in rows.items():
    rps = len(requests) / wall
    print(f'{"serve, " + str(c) + " client" + ("s" if c > 1 else ""):<28} {rps:>8.2f} '
          f'{rps / base_rps:>10.2f} {statistics.median(lat):>8.3f} {percentile(lat, 99):>8.3f} '
          f'{agree[c]:>5}/{len(requests):<5}')
  print()
  print(f'baseline passes: {", ".join(f"{len(requests) / b[0]:.2f}" for b in base)} req/s '
        f'(before and after the server passes; the better one is the baseline)')
  print(f'server batches: {served.get("batches")} for {served.get("answered")} answers, '
        f'sizes {served.get("batch_sizes")} (warm-up included)')
  result = ' '.join([f'baseline_rps={base_rps:.3f}'] +
                    [f'rps_c{c}={len(requests) / rows[c][0]:.3f}' for c in rows] +
                    [f'speedup_c{max(rows)}={len(requests) / rows[max(rows)][0] / base_rps:.2f}'])
  print(f'RESULT {result}')


if __name__ == '__main__':
  main()
