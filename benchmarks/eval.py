"""VideoQA evaluation throughput: questions per second at batch 1 and batch 8.

Runs `panda_jax.eval.videoqa.answer_file` (what `python -m panda_jax.eval.videoqa` runs) on the
tiny Video-Panda (`model_config('tiny')`: STAB hidden 64 at 112 px, a 4-layer 128-wide Llama;
random weights) over generated clips of moving shapes (`panda_jax.data.synthetic`, cached
under --workdir: --videos held-out clips of --width x --height, --seconds long, with their
questions, about 8 per clip), greedy, exactly --new tokens per answer (no end-of-sequence
stop, so every configuration does the same decoding work), --frames frames per video.

Four configurations over the same questions, each timed as a whole file (decoding, prompts,
generation, writing lines into a fresh predictions file), the median of --runs passes after a
first untimed pass that compiles every program the file needs (one per batch size and
prompt-length bucket); the configurations take turns within each pass, so a busy neighbour
slows them alike:

  batch 1 / batch 8        questions per generation call (`--batch_size`)
  inline / background      videos decoded on the calling thread (`decode_workers=0`) or by
                           --workers background threads running ahead of generation

plus decoding alone (every video through `load_clip`, one thread) for scale. The table gives
seconds, questions per second and each row's speed-up over batch 1 inline. The device is JAX's
default (the CPU here); on an accelerator the background decoders run on the host's cores while
the device generates.

Run from the repo root:
  python benchmarks/eval.py
  python benchmarks/eval.py --videos 3 --new 4 --workers 2 --runs 1     # quick
The last line is `RESULT device=<kind> bs1_qps=<x> bs8_qps=<y> ratio=<y/x>` (background decoding).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from panda_jax import config as config_lib  # noqa: E402
from panda_jax.data import qa, synthetic, text  # noqa: E402
from panda_jax.data.assembly import layout_batch  # noqa: E402
from panda_jax.eval import videoqa  # noqa: E402
from panda_jax.eval.generate import Sampling  # noqa: E402
from panda_jax.eval.predict import Predictor  # noqa: E402
from panda_jax.models.panda import VideoPanda  # noqa: E402
from common import timed  # noqa: E402


def dataset(workdir: str, videos: int, width: int, height: int, seconds: float):
  """The held-out clips, their questions and a tokenizer trained on their text (cached)."""
  root = os.path.join(workdir, f'eval_v{videos}_{width}x{height}_{seconds:g}s')
  done = os.path.join(root, 'done')
  if not os.path.exists(done):
    shutil.rmtree(root, ignore_errors=True)
    # One training clip (make_dataset keeps at least one); the rest are held out.
    ds = synthetic.make_dataset(root, videos + 1, seed=0, eval_fraction=videos / (videos + 1),
                                width=width, height=height, duration_s=seconds)
    entries = json.load(open(ds.eval_qa))
    corpus = [e['question'] for e in entries] + [e['answer'] for e in entries]
    text.build_tokenizer(os.path.join(root, 'tok'),
                         (corpus + [text.SYSTEM_PROMPT, 'USER: ASSISTANT:']) * 3)
    open(done, 'w').close()
  video_root = os.path.join(root, 'videos')
  records = qa.qa_records(qa.load_qa(os.path.join(root, 'eval_qa.json')), video_root)
  return records, video_root, os.path.join(root, 'tok')


def tiny_model(frames: int):
  """(PandaConfig, random variables) of the tiny size."""
  cfg = config_lib.panda_config(config_lib.model_config('tiny'))
  s = cfg.stab.image_size
  mask = np.ones((1, frames, s, s), np.float32)
  ids = np.array([[1] + [text.IMAGE_TOKEN_INDEX] * frames + [5]])
  lay = layout_batch(ids, None, np.ones_like(ids), mask, cfg.stab, max_len=160)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()}, mask=jnp.asarray(mask),
               pixels=jnp.zeros((1, frames, s, s, 3)))
  variables = nn.unbox(jax.jit(VideoPanda(cfg).init, static_argnames=('with_distill',))(
      jax.random.PRNGKey(0), batch, with_distill=False))
  return cfg, variables


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--videos', type=int, default=8, help='held-out clips (about 8 questions each)')
  ap.add_argument('--width', type=int, default=320)
  ap.add_argument('--height', type=int, default=240)
  ap.add_argument('--seconds', type=float, default=4.0)
  ap.add_argument('--frames', type=int, default=4, help='frames per video (multiple of 4)')
  ap.add_argument('--new', type=int, default=16, help='tokens generated per answer')
  ap.add_argument('--workers', type=int, default=4, help='background decoding threads')
  ap.add_argument('--runs', type=int, default=3, help='timed passes per configuration (median)')
  ap.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'panda_bench_eval'))
  args = ap.parse_args()
  if args.videos < 2:
    ap.error('--videos must be at least 2 (one warms up, all are timed)')
  if args.runs < 1:
    ap.error('--runs must be at least 1')
  if args.workers < 1:
    ap.error('--workers must be at least 1 (the background rows need a decoding thread)')

  records, video_root, tok_dir = dataset(args.workdir, args.videos, args.width, args.height,
                                         args.seconds)
  tok = text.load_tokenizer(tok_dir)
  cfg, variables = tiny_model(args.frames)
  predictor = Predictor(cfg, variables, tok, Sampling(max_new_tokens=args.new, eos_id=None))
  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores '
        f'({len(os.sched_getaffinity(0))} usable)')
  print(f'model: tiny Video-Panda (STAB hidden {cfg.stab.hidden} at {cfg.stab.image_size} px, '
        f'Llama {cfg.llm.layers} x {cfg.llm.hidden}), random weights; {args.frames} frames, '
        f'{args.new} new tokens per answer, greedy')
  print(f'data: {len(records)} questions over {args.videos} clips of {args.width} x '
        f'{args.height}, {args.seconds:g} s')

  decode_s, _ = timed(lambda: [videoqa.load_clip(os.path.join(video_root, path), cfg.stab,
                                                   args.frames)
                                 for path in sorted({r['video'] for r in records})])

  out_dir = tempfile.mkdtemp(prefix='bench_eval_')
  configs = [(bs, workers) for bs in (1, 8) for workers in (0, args.workers)]
  times = {c: [] for c in configs}
  for i in range(args.runs + 1):              # pass 0 compiles; configurations interleaved
    for bs, workers in configs:
      out = os.path.join(out_dir, f'{bs}_{workers}_{i}.jsonl')
      dt, stats = timed(lambda: videoqa.answer_file(
          predictor, records, video_root, out, batch_size=bs, frames=args.frames,
          progress=False, workers=workers))
      if i:
        times[(bs, workers)].append(dt)
      assert stats['answered'] == len(records), stats
  rows = {c: statistics.median(t) for c, t in times.items()}
  shutil.rmtree(out_dir)

  n = len(records)
  base = rows[(1, 0)]
  print()
  print(f'{"configuration":<34} {"s":>8} {"questions/s":>12} {"vs bs1 inline":>14}')
  for (bs, workers), dt in rows.items():
    how = 'inline decoding' if workers == 0 else f'{workers} background decoders'
    print(f'{f"batch {bs}, {how}":<34} {dt:>8.2f} {n / dt:>12.2f} {base / dt:>13.2f}x')
  print(f'{"decoding alone (1 thread)":<34} {decode_s:>8.2f} {"-":>12} {"-":>14}  '
        f'({args.videos / decode_s:.2f} videos/s)')
  bs1, bs8 = n / rows[(1, args.workers)], n / rows[(8, args.workers)]
  print()
  print(f'background decoding vs inline: batch 1 {rows[(1, 0)] / rows[(1, args.workers)]:.2f}x, '
        f'batch 8 {rows[(8, 0)] / rows[(8, args.workers)]:.2f}x')
  print(f'RESULT device={dev.platform} bs1_qps={bs1:.2f} bs8_qps={bs8:.2f} ratio={bs8 / bs1:.2f}')


if __name__ == '__main__':
  main()
