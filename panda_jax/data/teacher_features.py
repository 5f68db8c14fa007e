"""Cached teacher features on disk: one `.npy` file per video, mirroring the video tree.

Layout of a features directory (written by `python -m panda_jax.teacher.extract`):

  <dir>/features.json            manifest: frames per video, the teacher's config, patch grid,
                                 hidden size, storage dtype, and `complete` once a pass over
                                 the whole data set has finished
  <dir>/<video relpath>.npy      [frames, grid * grid, hidden] patch features of that video's
                                 teacher frames (the frames the sampler picks, padding frames
                                 of short videos included), float32 or float16
  <dir>/failures.json            videos the last pass could not decode (path, reason);
                                 failures.json.<i> per process when several shared the work
  <dir>/done.<i>-of-<n>.json     process i of n finished its share (the last one to finish
                                 sets `complete`)

Files are written to a temporary name and renamed, so a file that exists is complete: an
interrupted extraction resumes by skipping the videos whose file exists. Reading needs numpy
only (no JAX, no TensorFlow), so Grain workers load features cheaply.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

import numpy as np

from panda_jax import storage

MANIFEST = 'features.json'
FAILURES = 'failures.json'
DTYPES = ('float32', 'float16')


class FeatureError(ValueError):
  """A features directory that does not match the run (frames, teacher, sizes)."""


def feature_path(root: str, video: str) -> str:
  """Where the features of `video` (a path relative to the video root) live under `root`."""
  rel = os.path.normpath(video)
  if os.path.isabs(rel) or rel == '..' or rel.startswith('..' + os.sep):
    raise FeatureError(f'video path {video!r} must be relative to the video root and stay '
                       'inside it')
  return os.path.join(root, rel + '.npy')


def write_manifest(root: str, manifest: Mapping[str, Any]) -> None:
  # Several processes may write it at once (the last two to finish a shared extraction): each
  # write is atomic (storage.write_json).
  storage.write_json(storage.join(root, MANIFEST), dict(manifest), indent=2, sort_keys=True)


def read_manifest(root: str) -> dict:
  path = storage.join(root, MANIFEST)
  try:
    return storage.read_json(path)
  except FileNotFoundError:
    raise FeatureError(f'{root} holds no teacher features ({MANIFEST} is missing); write them '
                       'with python -m panda_jax.teacher.extract') from None
  except (OSError, ValueError) as e:
    raise FeatureError(f'{path}: unreadable manifest: {e}') from None


def check_manifest(manifest: Mapping[str, Any], frames: int, grid: int, hidden: int,
                   root: str = '') -> None:
  """Raises FeatureError naming every field that disagrees with the run."""
  want = {'frames': frames, 'grid': grid, 'hidden': hidden}
  bad = [f'{k}={manifest.get(k)!r} (the run needs {v})' for k, v in want.items()
         if manifest.get(k) != v]
  if bad:
    raise FeatureError(f'teacher features in {root or "the directory"} were extracted for a '
                       f'different setting: {", ".join(bad)}')


def feature_shape(manifest: Mapping[str, Any], frames: int, grid: int,
                  root: str = '') -> tuple[int, int, int]:
  """[frames, grid * grid, hidden] of each video's features, after `check_manifest`."""
  check_manifest(manifest, frames, grid, manifest.get('hidden'), root)
  return (frames, grid * grid, int(manifest['hidden']))


def save(path: str, features: np.ndarray, dtype: str = 'float32') -> None:
  """Writes one video's features atomically (temporary file + rename)."""
  if dtype not in DTYPES:
    raise FeatureError(f'feature dtype {dtype!r}; expected one of {DTYPES}')
  buf = io.BytesIO()
  np.save(buf, np.asarray(features, dtype))
  storage.write_bytes(path, buf.getvalue())


def load(source, shape: tuple[int, ...], where: str = '') -> np.ndarray:
  """One video's features as float32, from a file path or a file object (`where` names it in
  errors); FeatureError if missing, unreadable or misshaped."""
  where = where or str(source)
  try:
    if isinstance(source, str) and storage.is_remote(source):
      source = io.BytesIO(storage.read_bytes(source))
    a = np.load(source, allow_pickle=False)
  except FileNotFoundError:
    raise FeatureError(f'{where}: no cached teacher features for this video') from None
  except (OSError, ValueError, EOFError) as e:     # EOFError: an empty .npy file
    raise FeatureError(f'{where}: unreadable teacher features: {e or type(e).__name__}') from None
  if a.shape != tuple(shape):
    raise FeatureError(f'{where}: teacher features of shape {a.shape}; expected '
                       f'{tuple(shape)}')
  return a.astype(np.float32)
