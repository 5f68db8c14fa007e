"""Packed data sets for pods: sampled frames + conversation per record, in ArrayRecord shards.

Decoding videos is the most expensive host work of a training step, and a pod's hosts may not
see the video files at all. A packing pass (once, on any machine) decodes every video with the
training sampler (`video.decode_frames`: the authors' frame rule, seeking), encodes each picked
frame as an image at the video's own resolution, and writes one record per sample into
ArrayRecord shards through a TensorFlow Datasets builder (`PandaPacked`). Training reads them
back with `tfds.data_source` (random access; numpy only, TensorFlow is never imported) and the
same Grain pipeline: `PackedProcessSample` is `pipeline.ProcessSample` with its one frame
source (`decode`) replaced by "decode the stored images", so tokenisation, preprocessing
(`video.preprocess_frames`), the length check and the skip rules are the raw path's own code.

Frame encoding (`frame_format`): 'png' (default) is lossless, so batches read from packed shards
are identical, bit for bit, to batches decoded from the videos (tested). 'jpeg' (`quality`,
default 95) is several times smaller and faster to read but lossy: pixels differ from the raw
path by a few 8-bit levels (tested within a tolerance), so only PNG shards reproduce a raw run.

Builder configs (one per data set; `manual_dir` holds the inputs, see
`PandaPacked.MANUAL_DOWNLOAD_INSTRUCTIONS`):

  valley          stages 1-2: Valley's 702K video-text pairs (conversation format)
  videochatgpt    stage 3: the 100K Video-ChatGPT instructions (conversation format)
  msvd_qa, msrvtt_qa, tgif_qa, activitynet_qa    the zero-shot VideoQA sets

A config packed with other settings than 8 PNG frames gets its own name (and directory):
`<set>_<frames>f_<png|jpeg<quality>>`, e.g. `valley_16f_jpeg95`; `packed_config` builds it.

Training sets hold one record per conversation (`index`: its position in the annotation file,
`id`, `video`, `conversations` as JSON, `frames`, `frame_indices`, `video_frames`, `fps`, and
`teacher`: the video's cached teacher features file (`panda_jax.data.teacher_features`, `.npy`
bytes, empty where there is none) when packed with `teacher_features`). VideoQA sets hold one
record per video, with all its questions (`video_name`; `qa`: JSON list of `{question_id,
question, answer, type}`; `index`: the position of its first question), so a video's frames
are stored once; `qa_examples` reads them back. A video that cannot be decoded is skipped,
logged with its path and reason, and counted in the data set's metadata (`skipped`,
`skipped_examples`); packing never stops on a bad file.

Build (TensorFlow is not needed; tensorflow-datasets and array_record are):
  python -m panda_jax.data.packing --manual_dir=DIR --data_dir=OUT --config=videochatgpt \\
      [--frames=8] [--frame_format=png] [--quality=95] [--teacher_features=DIR] [--workers=N]
Build through Apache Beam (e.g. Valley's 702K videos on a cluster), with the same records
(same keys, same bytes, in annotation order) and the same `packed` / `skipped` /
`skipped_examples` metadata as the in-process build (tested):
  python -m panda_jax.data.packing --manual_dir=DIR --data_dir=OUT --config=valley \\
      --beam_runner=DataflowRunner --beam_options="--project=P --region=R \\
      --temp_location=gs://B/tmp --max_num_workers=200 --sdk_container_image=IMAGE"
  --beam_runner=SparkRunner --beam_options="--spark_master_url=spark://HOST:7077"
  --beam_runner=FlinkRunner --beam_options="--flink_master=HOST:8081"
  On this machine's cores (Beam's Python direct runner; 'DirectRunner' first tries Prism, a
  binary it downloads from GitHub):
      --beam_runner=FnApiRunner \\
      --beam_options="--direct_num_workers=N --direct_running_mode=multi_processing"
The driver reads the annotations and writes the sample list into the build's directory; the
workers read it, decode and encode each video with the in-process build's code (`_Packer`), and
TFDS's Beam writer shards the records by index. Skips leave the workers as a side output,
combined into the metadata once the pipeline is done (Beam counters `panda_packed/<reason>`
show them while it runs). Workers need this repository and requirements.txt (Dataflow: in the
SDK container image, with `apache-beam[gcp]`), `data_dir` on storage they all write (gs://...),
and the videos (and teacher features) at the same local paths: the decoder opens files, not
gs:// URLs, so a shared file system (NFS, Filestore, Lustre, a FUSE mount in the container).
Read:
  source = packing.open_packed(OUT, 'videochatgpt')   # or tfds.data_source('panda_packed/...')
  proc = packing.PackedProcessSample(source, tokenizer_dir, stab, frames=8, max_len=4096)
  it = pipeline.TrainIterator(packing.packed_records(source), proc, batch_size, seed=...)
The records handed to `TrainIterator` are record numbers, so hosts shard and shuffle indices
and never hold the data set in memory; a packed set without skipped videos shuffles exactly
like its annotation file (same seed -> same samples in the same order).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import io
import json
import logging
import multiprocessing
import os
import shlex
import time
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from panda_jax import storage
from panda_jax.data import pipeline
from panda_jax.data.video import VideoDecodeError, decode_frames
from panda_jax.models.stab import StabConfig
from panda_jax.data import teacher_features as features_lib

NAME = 'panda_packed'
FRAME_FORMATS = ('png', 'jpeg')
PACKING_VERSION = 1
# PNG level 1: on noisy 854 x 480 frames (benchmarks/data.py) the files were 12 % larger than
# at PIL's default level 6, in 55 % of the encoding time; packing is the slow side.
_PNG_LEVEL = 1
_MAX_SKIPPED_LISTED = 1000

SETS = {
    'valley': ('conversations', 'Valley video-text pairs (stages 1-2).'),
    'videochatgpt': ('conversations', 'Video-ChatGPT 100K video instructions (stage 3).'),
    'msvd_qa': ('qa', 'MSVD-QA zero-shot VideoQA.'),
    'msrvtt_qa': ('qa', 'MSRVTT-QA zero-shot VideoQA.'),
    'tgif_qa': ('qa', 'TGIF-QA (FrameQA) zero-shot VideoQA.'),
    'activitynet_qa': ('qa', 'ActivityNet-QA zero-shot VideoQA.'),
}


class PackingError(ValueError):
  """Packing cannot start or a packed set does not match the run (names the values)."""


# ------------------------------------------------------------------------------------------
# Frames as images


def encode_frames(frames: np.ndarray, frame_format: str = 'png',
                  quality: int = 95) -> list[bytes]:
  """uint8 [k, H, W, 3] -> one encoded image per frame."""
  if frame_format not in FRAME_FORMATS:
    raise PackingError(f'frame_format={frame_format!r}; expected one of {FRAME_FORMATS}')
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise PackingError(f'frames must be uint8 [k, H, W, 3], got {frames.dtype} '
                       f'{list(frames.shape)}')
  out = []
  for f in frames:
    buf = io.BytesIO()
    img = Image.fromarray(f, 'RGB')
    if frame_format == 'png':
      img.save(buf, 'PNG', compress_level=_PNG_LEVEL)
    else:
      img.save(buf, 'JPEG', quality=int(quality))
    out.append(buf.getvalue())
  return out


# What Pillow (12.3) raises for a corrupt, truncated or oversized image: UnidentifiedImageError
# (an OSError) when no format recognises it, OSError for truncated or broken data, SyntaxError
# for a broken PNG chunk, DecompressionBombError (not an OSError) for a huge declared size. A
# fuzz of 8,000 truncated and overwritten PNG and JPEG frames (PNG checksums recomputed for
# half) met nothing else. Pillow's ValueError for a short ancillary chunk whose checksum still
# matches (which `encode_frames` never writes) is left to propagate.
_BAD_IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def decode_images(images: Sequence[bytes], path: str = '') -> np.ndarray:
  """Encoded frames -> uint8 [k, H, W, 3]; VideoDecodeError (naming `path`) if unusable.

  Unusable: no frames, an image Pillow cannot read (`_BAD_IMAGE_ERRORS`), one not in RGB, or
  frames of different sizes. Any other error is a bug and propagates.
  """
  if not len(images):
    raise VideoDecodeError(path, 'packed record holds no frames')
  frames = []
  for i, data in enumerate(images):
    try:
      with Image.open(io.BytesIO(data)) as img:
        if img.mode != 'RGB':
          raise VideoDecodeError(path, f'packed frame {i}: image mode {img.mode}, expected RGB')
        frames.append(np.asarray(img))
    except _BAD_IMAGE_ERRORS as e:
      raise VideoDecodeError(path, f'packed frame {i}: {type(e).__name__}: {e}') from e
  if len({f.shape for f in frames}) != 1:
    raise VideoDecodeError(path, f'packed frames differ in size: {[f.shape for f in frames]}')
  return np.stack(frames)


# ------------------------------------------------------------------------------------------
# Builder


@dataclasses.dataclass(eq=False)
class PackedConfig(tfds.core.BuilderConfig):
  """One data set packed with given sampling and encoding settings."""
  data_set: str = 'videochatgpt'
  frames: int = 8
  frame_format: str = 'png'
  quality: int = 95

  @property
  def kind(self) -> str:
    return SETS[self.data_set][0]


def packed_config(data_set: str, frames: int = 8, frame_format: str = 'png',
                  quality: int = 95) -> PackedConfig:
  """The config for `data_set` packed with `frames` frames in `frame_format` (validated)."""
  if data_set not in SETS:
    raise PackingError(f'data set {data_set!r}; expected one of {sorted(SETS)}')
  if frames < 4 or frames % 4:
    raise PackingError(f'frames={frames} must be a positive multiple of 4')
  if frame_format not in FRAME_FORMATS:
    raise PackingError(f'frame_format={frame_format!r}; expected one of {FRAME_FORMATS}')
  if not 1 <= quality <= 100:
    raise PackingError(f'quality={quality} must be in [1, 100]')
  name = data_set
  if (frames, frame_format) != (8, 'png'):
    enc = 'png' if frame_format == 'png' else f'jpeg{quality}'
    name = f'{data_set}_{frames}f_{enc}'
  return PackedConfig(name=name, description=SETS[data_set][1], data_set=data_set,
                      frames=frames, frame_format=frame_format, quality=quality)


@dataclasses.dataclass(frozen=True)
class _Packer:
  """One sample of `PandaPacked._samples` -> its record: the per-video work of both builds
  (in this process or its pool, and the Beam pipeline's workers), so their records are equal.

  Returns (example or None when the video is skipped, the skip reason to count or None, the
  decoder's error). Picklable, so that packing workers can run it.
  """
  kind: str
  frames: int
  frame_format: str
  quality: int
  timeout_s: float
  teacher_features: str = ''

  def __call__(self, s: dict) -> tuple[dict | None, str | None, str]:
    if s['path'] is None:
      return None, 'bad_video', 'missing: no file matches the video name under videos/'
    try:
      decoded, info = decode_frames(s['path'], num=self.frames, timeout_s=self.timeout_s)
    except VideoDecodeError as e:
      return None, 'bad_video', e.reason
    example = {'index': s['index'], 'video': s['video'], **s['fields'],
               'frames': encode_frames(decoded, self.frame_format, self.quality),
               'frame_indices': np.asarray(info['indices'], np.int64),
               'video_frames': int(info['n_frames']), 'fps': float(info['fps'])}
    if self.kind != 'conversations':
      return example, None, ''
    data = _teacher_bytes(self.teacher_features, s['video']) if self.teacher_features else None
    example['teacher'] = data or b''
    if self.teacher_features and data is None:
      return example, 'missing_teacher_features', ''   # packed anyway, without features
    return example, None, ''


def _teacher_bytes(features_dir: str, video: str) -> bytes | None:
  try:
    with open(features_lib.feature_path(features_dir, video), 'rb') as f:
      return f.read()
  except (OSError, features_lib.FeatureError):
    return None


def _skipped_entry(s: dict, error: str) -> dict:
  """The metadata's `skipped_examples` entry of a skipped video (also logged)."""
  logging.warning('skipped %s (bad_video): %s', s['path'] or s['video'], error)
  return {'index': s['index'], 'path': s['video'], 'reason': error}


def _merge_skips(summaries) -> dict:
  """Skip summaries ({'counts': {reason: n}, 'listed': [entry]}) -> one, listing the
  `_MAX_SKIPPED_LISTED` lowest indices (the ones the in-process build lists). Associative and
  commutative: the Beam build combines partial summaries with it."""
  counts: collections.Counter = collections.Counter()
  listed: list[dict] = []
  for summary in summaries:
    counts.update(summary['counts'])
    listed += summary['listed']
  return {'counts': dict(sorted(counts.items())),
          'listed': heapq.nsmallest(_MAX_SKIPPED_LISTED, listed, key=lambda e: e['index'])}


def _beam_pack(line: str, packer: _Packer):
  """Beam: one JSON line of samples -> (index, example) and/or a skip summary ('skipped')."""
  beam = tfds.core.lazy_imports.apache_beam
  s = json.loads(line)
  example, reason, error = packer(s)
  if reason is not None:
    beam.metrics.Metrics.counter(NAME, reason).inc()    # live on the runner's monitoring page
    listed = [_skipped_entry(s, error)] if example is None else []
    yield beam.pvalue.TaggedOutput('skipped', {'counts': {reason: 1}, 'listed': listed})
  if example is not None:
    yield s['index'], example


def _write_json(value, path: str) -> None:
  epath.Path(path).write_text(json.dumps(value))


class PandaPacked(tfds.core.GeneratorBasedBuilder):
  """Video-Panda's data sets with each sample's sampled frames packed (ArrayRecord)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Sampled frames (PNG or JPEG), conversation / questions, teacher '
                            'features.'}
  BUILDER_CONFIGS = [packed_config(s) for s in SETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
One folder per data set under the manual directory, named as the config's data set:

  <manual_dir>/valley/annotations.json          training sets (valley, videochatgpt):
  <manual_dir>/videochatgpt/annotations.json    [{"id", "video", "conversations": [{"from":
                                                "human"|"gpt", "value"}, ...]}, ...], with
                                                `video` a path relative to the set's folder
  <manual_dir>/<qa set>/test_q.json             VideoQA sets (msvd_qa, msrvtt_qa, tgif_qa,
  <manual_dir>/<qa set>/test_a.json             activitynet_qa): [{"video_name", "question",
  <manual_dir>/<qa set>/videos/...              "question_id", "answer"}] in test_q.json, or
                                                the questions there and the answers in
                                                test_a.json (paired by position); videos found
                                                by `qa.resolve_video` under videos/

Symbolic links are fine (e.g. videos -> /data/MSVD/YouTubeClips).
"""

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    # Nothing is downloaded, so there are no checksums to look up. (tfds 4.9.10 looks for
    # them next to the builder's code through `importlib_resources`, a package it does not
    # declare on Python >= 3.9.)
    return None

  def __init__(self, *, teacher_features: str = '', workers: int = 1,
               timeout_s: float = 30.0, beam: bool = False, **kwargs):
    """`teacher_features`: a cached teacher features directory (training sets only);
    `workers`: processes decoding videos (1: in this process); `timeout_s`: per video;
    `beam`: pack through an Apache Beam pipeline (the runner and its workers are
    `download_and_prepare`'s `DownloadConfig(beam_runner=..., beam_options=...)`)."""
    self._teacher_features = teacher_features
    self._workers = int(workers)
    self._timeout_s = timeout_s
    self._beam = bool(beam)
    self._beam_files: tuple[epath.Path, epath.Path, int] | None = None
    if self._beam and self._workers > 1:
      raise PackingError(f'workers={workers} is for the in-process build; with Beam the '
                         'runner sets the workers (e.g. --direct_num_workers)')
    super().__init__(**kwargs)
    if teacher_features and self.builder_config.kind != 'conversations':
      raise PackingError(f'teacher_features={teacher_features!r} is for training sets; '
                         f'{self.builder_config.name} is a VideoQA set')

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    text = tfds.features.Text
    common = {
        'index': tfds.features.Scalar(np.int64, doc='position in the annotation file'),
        'video': text(doc='video path relative to the data set folder'),
        'frames': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_),
                                         doc=f'sampled frames, {cfg.frame_format} images'),
        'frame_indices': tfds.features.Tensor(shape=(None,), dtype=np.int64),
        'video_frames': tfds.features.Scalar(np.int64, doc='frames in the video'),
        'fps': tfds.features.Scalar(np.float64),
    }
    if cfg.kind == 'conversations':
      extra = {'id': text(), 'conversations': text(doc='JSON list of turns'),
               'teacher': tfds.features.Tensor(shape=(), dtype=np.object_,
                                               doc='.npy bytes of cached teacher features')}
    else:
      extra = {'video_name': text(), 'qa': text(doc='JSON list of questions')}
    metadata = tfds.core.MetadataDict(
        packing_version=PACKING_VERSION, data_set=cfg.data_set, kind=cfg.kind,
        frames=cfg.frames, frame_format=cfg.frame_format,
        quality=cfg.quality if cfg.frame_format == 'jpeg' else None)
    return tfds.core.DatasetInfo(
        builder=self, description=cfg.description, disable_shuffling=True,
        features=tfds.features.FeaturesDict({**common, **extra}), metadata=metadata)

  def _split_generators(self, dl_manager):
    root = os.path.join(os.fspath(dl_manager.manual_dir), self.builder_config.data_set)
    if not os.path.isdir(root):
      raise PackingError(f'{root} is missing: the manual directory needs a folder per data '
                         f'set.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return {'train' if self.builder_config.kind == 'conversations' else 'test':
            self._generate_examples(root)}

  def _samples(self, root: str) -> list[dict]:
    """(index, fields, video path) per record to pack, in order."""
    if self.builder_config.kind == 'conversations':
      entries = pipeline.load_annotations(os.path.join(root, 'annotations.json'))
      return [{'index': i, 'video': e['video'], 'path': os.path.join(root, e['video']),
               'fields': {'id': str(e.get('id', i)),
                          'conversations': json.dumps(e['conversations'])}}
              for i, e in enumerate(entries)]
    from panda_jax.data import qa as qa_lib  # VideoQA sets only
    answers = os.path.join(root, 'test_a.json')
    entries = qa_lib.load_qa(os.path.join(root, 'test_q.json'),
                             answers_path=answers if os.path.exists(answers) else None)
    videos = os.path.join(root, 'videos')
    by_video: dict[str, dict] = {}
    for i, r in enumerate(qa_lib.qa_records(entries, videos)):
      s = by_video.get(r['video_name'])
      if s is None:
        rel = r['video'] or r['video_name']
        s = by_video[r['video_name']] = {
            'index': i, 'video': os.path.join('videos', rel),
            'path': os.path.join(videos, rel) if r['video'] else None,
            'fields': {'video_name': r['video_name']}, 'qa': []}
      s['qa'].append({k: r[k] for k in ('question_id', 'question', 'answer', 'type')})
    samples = list(by_video.values())
    for s in samples:
      s['fields']['qa'] = json.dumps(s.pop('qa'))
    return samples

  def _generate_examples(self, root: str):
    """The examples of `root`: a generator (in-process build) or a Beam PTransform."""
    cfg = self.builder_config
    samples = self._samples(root)
    if self._teacher_features:
      self.info.metadata['teacher_manifest'] = features_lib.read_manifest(
          self._teacher_features)
    packer = _Packer(cfg.kind, cfg.frames, cfg.frame_format, cfg.quality, self._timeout_s,
                     self._teacher_features)
    if self._beam:
      return self._beam_examples(samples, packer)
    return self._examples(samples, packer)

  def _examples(self, samples: list[dict], packer: _Packer) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    skipped: collections.Counter = collections.Counter()
    listed: list[dict] = []
    pool = None
    if self._workers > 1:
      pool = multiprocessing.get_context('spawn').Pool(self._workers)
      results = pool.imap(packer, samples, chunksize=4)
    else:
      results = map(packer, samples)
    start, done = time.monotonic(), 0
    try:
      for s, (example, reason, error) in zip(samples, results):
        done += 1
        if done % 1000 == 0:
          rate = done / (time.monotonic() - start)
          logging.info('%s: %d / %d samples (%.1f/s, ETA %.0f s), %d skipped', cfg.name, done,
                       len(samples), rate, (len(samples) - done) / rate,
                       sum(skipped.values()))
        if reason is not None:
          skipped[reason] += 1
        if example is None:
          entry = _skipped_entry(s, error)
          if len(listed) < _MAX_SKIPPED_LISTED:
            listed.append(entry)
          continue
        yield s['index'], example
    finally:
      if pool is not None:
        pool.terminate()
    self._record_skips(len(samples), {'counts': dict(sorted(skipped.items())),
                                      'listed': listed})

  def _beam_examples(self, samples: list[dict], packer: _Packer):
    """The Beam build: the samples go to a JSON-lines file in the build's directory (on
    storage every worker reads, like the shards), so the pipeline graph stays small for 702K
    samples; workers decode and encode them; skips are combined into one summary file that
    `_process_pipeline_result` reads into the metadata once the pipeline has run."""
    beam = tfds.core.lazy_imports.apache_beam
    work = epath.Path(self.data_dir)   # the build's temporary directory at this point
    samples_path, summary_path = work / '_samples.jsonl', work / '_skipped.json'
    samples_path.write_text(''.join(json.dumps(s) + '\n' for s in samples))
    self._beam_files = (samples_path, summary_path, len(samples))

    def expand(pipeline):
      packed = (pipeline
                | 'ReadSamples' >> beam.io.ReadFromText(os.fspath(samples_path))
                | 'Pack' >> beam.FlatMap(_beam_pack, packer=packer).with_outputs(
                    'skipped', main='examples'))
      _ = (packed.skipped
           | 'CombineSkips' >> beam.CombineGlobally(_merge_skips)
           | 'WriteSkips' >> beam.Map(_write_json, path=os.fspath(summary_path)))
      return packed.examples

    return beam.ptransform_fn(expand)()

  def _process_pipeline_result(self, pipeline_result) -> None:
    del pipeline_result   # the skips come from the summary file (exact under retries)
    samples_path, summary_path, total = self._beam_files
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    samples_path.unlink()
    self._record_skips(total, summary)

  def _record_skips(self, total: int, summary: dict) -> None:
    meta = self.info.metadata
    meta['packed'] = total - summary['counts'].get('bad_video', 0)
    meta['skipped'] = summary['counts']
    meta['skipped_examples'] = summary['listed']
    logging.info('%s: packed %d of %d samples; skipped %s', self.builder_config.name,
                 meta['packed'], total, summary['counts'] or 'none')


def build(manual_dir: str, data_dir: str, data_set: str, frames: int = 8,
          frame_format: str = 'png', quality: int = 95, teacher_features: str = '',
          workers: int = 1, timeout_s: float = 30.0, beam_runner: str = '',
          beam_options: str | Sequence[str] = ()) -> PandaPacked:
  """Packs one data set (see the module docstring); returns the prepared builder.

  `beam_runner` (e.g. 'DirectRunner', 'DataflowRunner', 'SparkRunner', 'FlinkRunner'): pack
  through an Apache Beam pipeline on that runner, with `beam_options` its pipeline flags (one
  string, split like a shell, or a list: '--direct_num_workers=2 ...'); '' packs in this
  process (`workers` processes decoding). Both builds write the same records and metadata.
  """
  if beam_options and not beam_runner:
    raise PackingError(f'beam_options={beam_options!r} need a beam_runner (e.g. DirectRunner)')
  config = packed_config(data_set, frames, frame_format, quality)
  if config.name in PandaPacked.builder_configs:
    config = config.name  # tfds takes its own configs by name only
  builder = PandaPacked(config=config, data_dir=data_dir, file_format='array_record',
                        teacher_features=teacher_features, workers=workers,
                        timeout_s=timeout_s, beam=bool(beam_runner))
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if beam_runner:
    beam = tfds.core.lazy_imports.apache_beam
    flags = shlex.split(beam_options) if isinstance(beam_options, str) else list(beam_options)
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, beam_runner=beam_runner,
        beam_options=beam.options.pipeline_options.PipelineOptions(flags))
  builder.download_and_prepare(download_config=download_config)
  return builder


# ------------------------------------------------------------------------------------------
# Reading (numpy only)


def dataset_dir(data_dir: str, config: str) -> str:
  """The directory of the newest packed version of `config` under `data_dir`."""
  root = storage.join(data_dir, NAME, config)
  versions = sorted((d for d in (storage.listdir(root) if storage.isdir(root) else [])
                     if _is_version(d) and storage.exists(storage.join(root, d,
                                                                        'dataset_info.json'))),
                    key=lambda v: tuple(int(x) for x in v.split('.')))
  if not versions:
    raise PackingError(f'no packed data set {config!r} under {data_dir} (looked in {root}); '
                       'build it with python -m panda_jax.data.packing')
  return storage.join(root, versions[-1])


def _is_version(name: str) -> bool:
  """Whether a directory name is a data set version (1.0.0), not tfds' scratch folders."""
  return all(x.isdigit() for x in name.split('.'))


def open_packed(data_dir: str, config: str, split: str | None = None):
  """The random-access source of a packed set (`tfds` ArrayRecord data source).

  Read from the files alone (the builder class is not needed), without TensorFlow. `split`:
  'train' for training sets, 'test' for VideoQA sets (default: the one there is).
  """
  builder = tfds.builder_from_directory(dataset_dir(data_dir, config))
  if split is None:
    split = 'train' if builder.info.metadata['kind'] == 'conversations' else 'test'
  return builder.as_data_source(split=split)


def packed_records(source) -> list[int]:
  """The records to hand to `pipeline.TrainIterator` with a `PackedProcessSample`."""
  return list(range(len(source)))


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def as_record(example: Mapping) -> dict:
  """A packed training example as a `pipeline.load_annotations` record (+ frames, teacher)."""
  return {'id': _text(example['id']), 'video': _text(example['video']),
          'conversations': json.loads(_text(example['conversations'])),
          'frames': example['frames'], 'teacher': example.get('teacher', b'')}


class PackedProcessSample(pipeline.ProcessSample):
  """Record number -> `ProcessSample`'s arrays, the frames read from a packed source.

  `source`: from `open_packed` (or `tfds.data_source`). `teacher_features`: use the features
  packed with the set (`teacher` [frames, grid * grid, hidden] instead of `teacher_pixels`, as
  `ProcessSample` with a features directory); a record without them is skipped and counted
  (`missing_teacher_features`). Skip messages name `<dataset dir>/<video>`.
  """

  def __init__(self, source, tokenizer_dir: str, stab: StabConfig, frames: int, max_len: int,
               teacher_features: bool = False, system_prompt: str = 'videopanda_v1',
               system_message: str | None = None):
    info = source.dataset_info
    meta = info.metadata or {}
    if meta.get('kind') != 'conversations':
      raise PackingError(f'{info.data_dir}: a packed {meta.get("kind")!r} set; training needs '
                         'a conversation set (valley, videochatgpt)')
    if meta.get('frames') != frames:
      raise PackingError(f'{info.data_dir} was packed with frames={meta.get("frames")}; the '
                         f'run needs frames={frames} (pack again with --frames={frames})')
    super().__init__(os.fspath(info.data_dir), tokenizer_dir, stab, frames, max_len,
                     system_prompt=system_prompt, system_message=system_message)
    self.source = source
    self.use_teacher = bool(teacher_features)
    self.teacher_shape = None
    if self.use_teacher:
      manifest = meta.get('teacher_manifest')
      if not manifest:
        raise PackingError(f'{info.data_dir} was packed without teacher features; pack with '
                           '--teacher_features=DIR or train with the online teacher')
      self.teacher_shape = features_lib.feature_shape(manifest, frames, stab.target_grid,
                                                      os.fspath(info.data_dir))

  def decode(self, record: Mapping, path: str) -> np.ndarray:
    return decode_images(record['frames'], path)

  def __call__(self, index) -> dict:
    record = as_record(self.source[int(index)])
    out = super().__call__(record)
    if 'skip' in out or not self.use_teacher:
      return out
    path = os.path.join(self.video_root, record['video'])
    try:
      out['teacher'] = load_teacher(record['teacher'], self.teacher_shape, path)
    except PackingError as e:
      return {'skip': 'missing_teacher_features', 'path': path, 'detail': str(e)[:200]}
    del out['teacher_pixels']
    return out


def load_teacher(data: bytes, shape: tuple[int, ...], path: str = '') -> np.ndarray:
  """Packed `.npy` bytes -> float32 features of `shape`; PackingError if absent or wrong."""
  if not data:
    raise PackingError(f'{path}: no teacher features were packed for this video')
  try:
    return features_lib.load(io.BytesIO(data), shape, f'{path} (packed)')
  except features_lib.FeatureError as e:
    raise PackingError(str(e)) from None


def qa_examples(source) -> Iterator[dict]:
  """A packed VideoQA set's questions, one dict per video: video_name, video, frames (uint8
  [k, H, W, 3]) and qa (list of {question_id, question, answer, type})."""
  for i in range(len(source)):
    ex = source[i]
    video = _text(ex['video'])
    yield {'video_name': _text(ex['video_name']), 'video': video,
           'frames': decode_images(ex['frames'], video), 'qa': json.loads(_text(ex['qa']))}


# ------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str]) -> None:
  from absl import flags
  f = flags.FLAGS
  if len(argv) > 1:
    raise PackingError(f'unexpected arguments {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  t0 = time.monotonic()
  builder = build(f.manual_dir, f.data_dir, f.config, frames=f.frames,
                  frame_format=f.frame_format, quality=f.quality,
                  teacher_features=f.teacher_features, workers=f.workers,
                  timeout_s=f.timeout_s, beam_runner=f.beam_runner,
                  beam_options=f.beam_options)
  meta = builder.info.metadata
  print(f'{builder.data_dir}: packed {meta["packed"]} records in '
        f'{time.monotonic() - t0:.0f} s; skipped {meta["skipped"] or "none"}')


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string('manual_dir', None, 'Folder holding one folder per data set (see '
                      'PandaPacked.MANUAL_DOWNLOAD_INSTRUCTIONS).', required=True)
  flags.DEFINE_string('data_dir', None, 'Where the packed sets are written.', required=True)
  flags.DEFINE_enum('config', None, sorted(SETS), 'Data set to pack.', required=True)
  flags.DEFINE_integer('frames', 8, 'Frames sampled per video (a multiple of 4).')
  flags.DEFINE_enum('frame_format', 'png', FRAME_FORMATS, 'png: lossless; jpeg: smaller.')
  flags.DEFINE_integer('quality', 95, 'JPEG quality.')
  flags.DEFINE_string('teacher_features', '', 'Cached teacher features directory to pack.')
  flags.DEFINE_integer('workers', 1, 'Processes decoding videos.')
  flags.DEFINE_float('timeout_s', 30.0, 'Time budget per video.')
  flags.DEFINE_string('beam_runner', '', 'Pack through Apache Beam on this runner '
                      '(DirectRunner, DataflowRunner, SparkRunner, FlinkRunner); empty: in '
                      'this process with --workers.')
  flags.DEFINE_string('beam_options', '', 'The Beam pipeline flags, one string (e.g. '
                      '"--direct_num_workers=2 --direct_running_mode=multi_processing").')


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
