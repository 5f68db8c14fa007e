"""Host-side video loading benchmark: raw video files -> model inputs, one process.

Generates (once, cached under --workdir) two H.264 clips with `panda_jax.data.synthetic`
(mpeg4 where PyAV's FFmpeg has no libx264): moving shapes with per-frame noise so that a
frame costs about as much to decode as ordinary footage, not almost nothing.

  short   --short_seconds (10) s at 854 x 480, --fps (30), keyframe every --short_gop (250,
          libx264's default) frames
  long    --long_seconds (60) s at 640 x 360, keyframe every --long_gop_s (2) s

and times, median of --runs, runs of the variants interleaved:

  (a) short clip: `load_video` (8 frames: decode with seeking, resize for student and
      teacher, pad, mask, normalise) against the floor of decoding every frame of the clip
      with nothing else (no colour conversion) -> short_clip_overhead_vs_decode = ours /
      decode_all.
  (b) long clip: `decode_frames` with seeking (ours) against decoding every frame and taking
      the sampled ones (`seek=False`: same 8 frames, no seeks) -> long_clip_speedup_vs_naive
      = naive / ours.
  videos_per_s_per_worker: complete samples (`load_video`) per second in this process over
  the two clips alternately, 2 / (short + long).
  (c) packed ArrayRecord shards: both clips packed once (`panda_jax.data.packing`, the same
      8 sampled frames, PNG and JPEG quality 95) and read back as training does: a random-
      access read from the tfds data source, the stored images decoded, then the same
      preprocessing as `load_video` (`preprocess_frames`) -> packed_videos_per_s_per_worker
      (PNG, bit-identical to the raw path) on the same alternation.

Decoding is single-threaded (--threads 1, like the reference's decord `num_threads=1`) in
every variant, so a worker is one core. Run from the repo root:
  python benchmarks/data.py
  python benchmarks/data.py --runs 3 --short_seconds 2 --long_seconds 6   # quick
The last line is `RESULT videos_per_s_per_worker=<x> long_clip_speedup_vs_naive=<y>
short_clip_overhead_vs_decode=<z> packed_videos_per_s_per_worker=<w>`.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402

from panda_jax.data import packing, synthetic  # noqa: E402
from panda_jax.data.video import decode_frames, load_video, preprocess_frames  # noqa: E402
from common import timed  # noqa: E402


def make_clip(workdir, name, width, height, fps, seconds, gop, noise, codec, seed):
  path = os.path.join(workdir, f'{name}_{width}x{height}_{fps}fps_{seconds}s_gop{gop}_'
                               f'n{noise}_{codec}_s{seed}.mp4')
  if not os.path.exists(path):
    t0 = time.perf_counter()
    scene = synthetic.random_scene(np.random.default_rng(seed), width=width, height=height,
                                   fps=fps, duration_s=seconds, max_shapes=3, noise=noise)
    synthetic.write_scene_video(path + '.tmp.mp4', scene, codec=codec, gop=gop)
    os.replace(path + '.tmp.mp4', path)
    print(f'  generated {os.path.basename(path)} in {time.perf_counter() - t0:.1f} s')
  return path


def describe(path):
  with av.open(path) as c:
    s = c.streams.video[0]
    packets = sorted((p.pts, p.is_keyframe) for p in c.demux(s) if p.size)
    n = len(packets)
    keys = sum(k for _, k in packets)
    size = os.path.getsize(path)
    secs = n / float(s.average_rate)
    return (f'{s.codec_context.name} {s.codec_context.width}x{s.codec_context.height} '
            f'{float(s.average_rate):g} fps, {n} frames, {keys} keyframes, '
            f'{size * 8 / secs / 1e6:.2f} Mbit/s')


def decode_all(path, threads):
  """The floor: every frame decoded, nothing else."""
  with av.open(path) as c:
    s = c.streams.video[0]
    s.codec_context.thread_count = threads
    n = 0
    for _ in c.decode(s):
      n += 1
  return n


def pack_clips(workdir, clips, frame_format):
  """Packs the clips (once, cached per clip pair) as a training set; returns the data source."""
  tag = '_'.join(os.path.splitext(os.path.basename(c))[0] for c in clips)
  manual = os.path.join(workdir, 'packed', tag, 'manual')
  data_dir = os.path.join(workdir, 'packed', tag)
  name = packing.packed_config('valley', 8, frame_format).name
  if not os.path.isdir(os.path.join(data_dir, packing.NAME, name)):
    os.makedirs(os.path.join(manual, 'valley'), exist_ok=True)
    entries = [{'id': f'clip{i}', 'video': os.path.abspath(c), 'conversations': [
        {'from': 'human', 'value': '<video>\nDescribe the video.'},
        {'from': 'gpt', 'value': 'Shapes move.'}]} for i, c in enumerate(clips)]
    with open(os.path.join(manual, 'valley', 'annotations.json'), 'w') as f:
      json.dump(entries, f)
    t0 = time.perf_counter()
    packing.build(manual, data_dir, 'valley', frames=8, frame_format=frame_format)
    print(f'  packed the clips ({frame_format}) in {time.perf_counter() - t0:.1f} s')
  return packing.open_packed(data_dir, name)


def read_packed(source, i):
  """One sample from packed shards, as `PackedProcessSample` makes it (without the text)."""
  frames = packing.decode_images(source[i]['frames'])
  return preprocess_frames(frames, num=8, size=448, teacher_size=224, patch=14)


def bench(variants, runs):
  """Median seconds per variant; variants interleaved so drifting load hits all alike."""
  times = {k: [] for k in variants}
  extra = {}
  for fn in variants.values():   # warm-up (file cache, imports)
    fn()
  for _ in range(runs):
    for k, fn in variants.items():
      dt, out = timed(fn)
      times[k].append(dt)
      extra[k] = out
  return {k: statistics.median(v) for k, v in times.items()}, extra


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--runs', type=int, default=7)
  ap.add_argument('--workdir', default='/tmp/panda_jax_bench_data')
  ap.add_argument('--fps', type=int, default=30)
  ap.add_argument('--noise', type=int, default=7, help='per-frame noise amplitude (8-bit)')
  ap.add_argument('--short_seconds', type=float, default=10)
  ap.add_argument('--short_gop', type=int, default=250)
  ap.add_argument('--long_seconds', type=float, default=60)
  ap.add_argument('--long_gop_s', type=float, default=2)
  ap.add_argument('--threads', type=int, default=1, help='decoder threads per worker')
  ap.add_argument('--codec', default=None, help='default: libx264 if available, else mpeg4')
  args = ap.parse_args()
  codec = args.codec or synthetic.default_codec()
  os.makedirs(args.workdir, exist_ok=True)

  print(f'PyAV {av.__version__}, codec {codec}, {os.cpu_count()} CPU cores, load average '
        f'{os.getloadavg()[0]:.2f}, decoder threads {args.threads}, runs {args.runs}')
  short = make_clip(args.workdir, 'short', 854, 480, args.fps, args.short_seconds,
                    args.short_gop, args.noise, codec, 0)
  long = make_clip(args.workdir, 'long', 640, 360, args.fps, args.long_seconds,
                   int(round(args.long_gop_s * args.fps)), args.noise, codec, 1)
  print(f'short clip: {describe(short)}')
  print(f'long clip:  {describe(long)}')
  th = args.threads

  t_short, ex_short = bench({
      'decode_all': lambda: decode_all(short, th),
      'load_video': lambda: load_video(short, threads=th)['info'],
      'decode_frames': lambda: decode_frames(short, threads=th)[1],
  }, args.runs)
  t_long, ex_long = bench({
      'naive': lambda: decode_frames(long, seek=False, threads=th)[1],
      'ours': lambda: decode_frames(long, threads=th)[1],
      'load_video': lambda: load_video(long, threads=th)['info'],
      'decode_all': lambda: decode_all(long, th),
  }, args.runs)
  # Same frames either way (tests/test_video.py checks pixels; here the positions).
  assert list(ex_long['naive']['indices']) == list(ex_long['ours']['indices'])

  def row(clip, what, sec, info=None):
    if isinstance(info, dict):
      dec = info['decoded_count']
      seeks = info['seeks']
    else:
      dec, seeks = info, 0
    print(f'{clip:<6} {what:<46} {sec * 1e3:>9.1f} {dec:>9} {seeks:>6}')

  print()
  print(f'{"clip":<6} {"variant":<46} {"ms":>9} {"decoded":>9} {"seeks":>6}')
  row('short', 'decode every frame, no conversion (floor)', t_short['decode_all'],
      ex_short['decode_all'])
  row('short', 'decode_frames: 8 sampled frames, seek', t_short['decode_frames'],
      ex_short['decode_frames'])
  row('short', 'load_video: + resize 448/224, pad, normalise', t_short['load_video'],
      ex_short['load_video'])
  row('long', 'decode every frame, no conversion (floor)', t_long['decode_all'],
      ex_long['decode_all'])
  row('long', 'naive: decode all, take the 8 (seek=False)', t_long['naive'], ex_long['naive'])
  row('long', 'ours: decode_frames with seeking', t_long['ours'], ex_long['ours'])
  row('long', 'load_video (ours)', t_long['load_video'], ex_long['load_video'])
  print('("decoded" = frames output by the decoder; with seeking, unwanted non-reference '
        'frames are dropped inside the decoder and not counted)')

  sources = {fmt: pack_clips(args.workdir, [short, long], fmt) for fmt in packing.FRAME_FORMATS}
  t_packed, _ = bench({f'{fmt}_{clip}': (lambda s=sources[fmt], i=i: read_packed(s, i))
                       for fmt in packing.FRAME_FORMATS
                       for i, clip in enumerate(('short', 'long'))}, args.runs)
  for fmt, src in sources.items():
    for i, clip in enumerate(('short', 'long')):
      size = sum(len(f) for f in src[i]['frames'])
      row(clip, f'packed {fmt} ({size / 2**20:.1f} MiB): images + preprocess',
          t_packed[f'{fmt}_{clip}'], 8)
  print('(packed: "decoded" = images decoded; PNG is lossless, JPEG quality 95 is not)')

  z = t_short['load_video'] / t_short['decode_all']
  y = t_long['naive'] / t_long['ours']
  vps = 2 / (t_short['load_video'] + t_long['load_video'])
  print()
  print(f'short clip: load_video / decode_all = {z:.3f} (goal <= 1.25)')
  print(f'long clip: naive / ours = {y:.2f}x (goal >= 3)')
  print(f'samples/s per worker (raw videos, load_video, short and long alternately): '
        f'{vps:.2f}  [short {1 / t_short["load_video"]:.2f}/s, long '
        f'{1 / t_long["load_video"]:.2f}/s]')
  pvps = {fmt: 2 / (t_packed[f'{fmt}_short'] + t_packed[f'{fmt}_long'])
          for fmt in packing.FRAME_FORMATS}
  print()
  print(f'{"samples/s per worker":<34} {"short":>8} {"long":>8} {"both":>8} {"vs raw":>8}')
  print(f'{"raw videos (load_video)":<34} {1 / t_short["load_video"]:>8.2f} '
        f'{1 / t_long["load_video"]:>8.2f} {vps:>8.2f} {1:>8.2f}')
  for fmt in packing.FRAME_FORMATS:
    print(f'{"packed ArrayRecord, " + fmt:<34} {1 / t_packed[fmt + "_short"]:>8.2f} '
          f'{1 / t_packed[fmt + "_long"]:>8.2f} {pvps[fmt]:>8.2f} {pvps[fmt] / vps:>8.2f}')
  print(f'RESULT videos_per_s_per_worker={vps:.2f} long_clip_speedup_vs_naive={y:.2f} '
        f'short_clip_overhead_vs_decode={z:.3f} packed_videos_per_s_per_worker={pvps["png"]:.2f}')


if __name__ == '__main__':
  main()
