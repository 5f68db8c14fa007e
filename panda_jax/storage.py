"""One storage layer for every user path: local paths and `gs://` URIs alike.

Workdirs, checkpoints, metrics, `config.json`, `summary.json`, tokenizers, converted weights,
packed shards, teacher features, predictions and scores are read and written through these
functions, never through `open`, `os.path` or `pathlib` on the user's string. Underneath is
`etils.epath`, the layer Orbax, TFDS and Grain already use: a local path goes to the OS, a
`gs://bucket/...` URI to gcsfs (fsspec), with the client library's own credentials
(application default credentials on a TPU VM or a GCE host). Orbax's array data goes through
TensorStore's GCS driver on its own.

Emulators and tests need no switch of ours: gcsfs and google-cloud-storage (TensorBoard event
files) follow `STORAGE_EMULATOR_HOST`, TensorStore follows `TENSORSTORE_GCS_HTTP_URL`.

Whole files are written atomically: a local file through a temporary file and a rename, an
object by its single upload. Objects cannot be appended to; `LineLog` keeps a line-per-record
file (metrics.jsonl) by rewriting the object on each flush.

Errors: a missing file raises FileNotFoundError naming it; anything else the backend raises
for a path (no such bucket, no permission, no network) becomes a StorageError naming the path
and the operation, with the backend's error chained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Iterator

from etils import epath

PathLike = str | os.PathLike


class StorageError(OSError):
  """A path could not be read or written (not a missing file: that is FileNotFoundError)."""


def is_remote(p: PathLike) -> bool:
  """Whether `p` is a URI (`gs://...`, any scheme) rather than a local path."""
  return '://' in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path; a local path made absolute (so a later chdir does not move it)."""
  s = os.fspath(p)
  if not s:
    raise ValueError('an empty path was given where a file or directory is needed')
  if is_remote(s):
    scheme = s.split('://', 1)[0]
    if scheme not in ('gs', 's3', 'az', 'hf'):
      raise ValueError(f'{s!r}: unsupported scheme {scheme!r}; use a local path or gs://, s3://, '
                       'az://')
    _no_listing_cache()
    return epath.Path(s)
  return epath.Path(os.path.abspath(s))


def _no_listing_cache() -> None:
  """Turns off gcsfs's in-process cache of directory listings (before the first Cloud Storage
  filesystem is made; etils keeps that one for the process): other processes write into the
  same bucket (a peer's checkpoint, its share of the predictions), and a cached listing would
  not show it."""
  import fsspec.config  # pylint: disable=import-outside-toplevel
  fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


def join(p: PathLike, *parts: str) -> str:
  """`p/part/...` as a string (a URI stays a URI, a local path stays as given)."""
  s = os.fspath(p)
  for part in parts:
    s = s.rstrip('/') + '/' + str(part) if is_remote(s) else os.path.join(s, str(part))
  return s


@contextlib.contextmanager
def _errors(op: str, p: PathLike):
  """Turns a backend's error about `p` into FileNotFoundError / StorageError naming it."""
  try:
    yield
  except FileNotFoundError as e:
    if str(e).startswith(f'{op} '):
      raise                # already ours (a nested call)
    raise FileNotFoundError(f'{op} {os.fspath(p)}: no such file or directory') from e
  except (StorageError, IsADirectoryError, NotADirectoryError, FileExistsError):
    raise
  except Exception as e:  # gcsfs / google-auth / aiohttp errors have no common base class
    if isinstance(e, (TypeError, AttributeError, KeyError)):
      raise                # a bug of the caller's, not of the storage
    raise StorageError(f'{op} {os.fspath(p)}: {type(e).__name__}: {e}') from e


def exists(p: PathLike) -> bool:
  with _errors('cannot look up', p):
    return path(p).exists()


def isdir(p: PathLike) -> bool:
  with _errors('cannot look up', p):
    return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  with _errors('cannot look up', p):
    q = path(p)
    return q.exists() and not q.is_dir()


def makedirs(p: PathLike) -> None:
  """Creates the directory `p` and its parents (on Cloud Storage directories are prefixes:
  nothing needs creating, and nothing is)."""
  if is_remote(p):
    return
  with _errors('cannot create directory', p):
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """The names in directory `p`, sorted."""
  with _errors('cannot list', p):
    return sorted(c.name for c in path(p).iterdir())


def remove(p: PathLike, missing_ok: bool = True) -> None:
  with _errors('cannot remove', p):
    q = path(p)
    if missing_ok and not q.exists():
      return
    q.unlink()


def remove_matching(p: PathLike, patterns) -> list[str]:
  """Deletes the files and directory trees directly in directory `p` whose names match any of
  the glob `patterns`; returns their names (none when `p` does not exist)."""
  import fnmatch  # pylint: disable=import-outside-toplevel
  if not isdir(p):
    return []
  gone = [n for n in listdir(p) if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
  for name in gone:
    q = path(p) / name
    with _errors('cannot remove', q):
      if q.is_dir():
        q.rmtree()
      else:
        q.unlink()
  return gone


def read_bytes(p: PathLike) -> bytes:
  with _errors('cannot read', p):
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  with _errors('cannot read', p):
    return path(p).read_text()


def read_json(p: PathLike) -> Any:
  """The JSON document in file `p` (a ValueError naming `p` when it does not parse)."""
  text = read_text(p)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{os.fspath(p)} is not valid JSON: {e}') from e


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `data` as the whole of file `p`, atomically (its directory is created)."""
  with _errors('cannot write', p):
    q = path(p)
    if is_remote(p):
      q.write_bytes(data)
      return
    q.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{q.name}.', suffix='.tmp', dir=os.fspath(q.parent))
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(data)
      os.replace(tmp, os.fspath(q))
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def write_json(p: PathLike, obj: Any, **dump_args) -> None:
  """`obj` as JSON in file `p`, atomically (`dump_args` go to json.dumps)."""
  write_text(p, json.dumps(obj, **dump_args))


@contextlib.contextmanager
def open_file(p: PathLike, mode: str = 'r') -> Iterator[Any]:
  """A file object for streaming `p` ('r', 'rb', 'w', 'wb'; a URI's object is uploaded when
  the file closes). Use `write_*` for whole files and `LineLog` to append."""
  if mode not in ('r', 'rb', 'w', 'wb'):
    raise ValueError(f'mode={mode!r}; expected r, rb, w or wb (objects cannot be appended to: '
                     'use storage.LineLog)')
  with _errors('cannot open', p):
    q = path(p)
    if 'w' in mode and not is_remote(p):
      q.parent.mkdir(parents=True, exist_ok=True)
    f = q.open(mode)
  try:
    yield f
  finally:
    with _errors('cannot write' if 'w' in mode else 'cannot close', p):
      f.close()


class LineLog:
  """A file of lines that grows by `append` (metrics.jsonl, prediction files).

  Local: opened for appending, flushed after each line. A URI: the object is read once at
  the start (a resumed run keeps what its predecessor wrote) and rewritten whole (objects
  cannot be appended to) by `flush`, `close`, and an `append` that comes at least
  `interval_s` seconds after the last rewrite; a kill loses at most those seconds of lines.
  """

  def __init__(self, p: PathLike, interval_s: float = 30.0):
    self.path = os.fspath(p)
    self._remote = is_remote(p)
    self._interval = interval_s
    self._written = time.monotonic()
    self._dirty = False
    if self._remote:
      self._text = read_text(p) if exists(p) else ''
      if self._text and not self._text.endswith('\n'):
        self._text += '\n'          # a partial last line is closed, not continued
      self._file = None
    else:
      makedirs(os.path.dirname(path(p).as_posix()))
      local = os.fspath(path(p))
      with _errors('cannot open', p):
        torn = os.path.exists(local) and _ends_without_newline(local)
        self._file = open(local, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
        if torn:
          self._file.write('\n')     # a partial last line is closed, not continued

  def append(self, line: str) -> None:
    """Adds `line` (a newline is added) and makes it durable."""
    line = line.rstrip('\n') + '\n'
    if self._remote:
      self._text += line
      self._dirty = True
      if time.monotonic() - self._written >= self._interval:
        self.flush()
      return
    with _errors('cannot write', self.path):
      self._file.write(line)
      self._file.flush()

  def flush(self) -> None:
    """Makes every appended line durable (a URI's object is rewritten if lines were added)."""
    if self._remote and self._dirty:
      write_text(self.path, self._text)
      self._dirty = False
      self._written = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _ends_without_newline(local: str) -> bool:
  with open(local, 'rb') as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b'\n'


def cache_root() -> str:
  """Where `local_copy` keeps local copies of remote files: $PANDA_JAX_CACHE, else
  ~/.cache/panda_jax."""
  return os.environ.get('PANDA_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'panda_jax')


def scratch_dir(workdir: PathLike, name: str) -> str:
  """A local directory for what a run generates and reads back with libraries that need
  local files (synthetic videos, extracted teacher features): `workdir/cache/name` for a local
  workdir; for a URI, `cache_root()/workdirs/<hash of the URI>/name` on this host."""
  s = os.fspath(workdir)
  if not is_remote(s):
    return os.path.join(s, 'cache', name)
  return os.path.join(cache_root(), 'workdirs', hashlib.sha256(s.encode()).hexdigest()[:16],
                      name)


def local_copy(p: PathLike) -> str:
  """A local path holding what `p` holds: `p` itself when it is local, else a copy of the
  remote file or directory tree in the cache (`cache_root()/remote/<hash>/<name>`), for the
  libraries that read only local files (transformers' tokenizers, Hugging Face checkpoint
  directories).

  A file's copy is reused while the remote file is the version it was copied from (its object
  generation; recorded beside the copies, in `<hash>/.stamps`); a remote path that does not
  exist raises FileNotFoundError naming it.
  """
  s = os.fspath(p)
  if not is_remote(s):
    return s
  src = path(s)
  with _errors('cannot copy', s):
    if not src.exists():
      raise FileNotFoundError(f'cannot copy {s}: no such file or directory')
    name = src.name or 'root'
    root = os.path.join(cache_root(), 'remote', hashlib.sha256(s.encode()).hexdigest()[:16])
    dst, stamps = os.path.join(root, name), os.path.join(root, '.stamps', name)
    if src.is_dir():
      _copy_tree(src, dst, stamps)
    else:
      _copy_file(src, dst, stamps)
  return dst


def _copy_tree(src: epath.Path, dst: str, stamps: str) -> None:
  for child in src.iterdir():
    copy = _copy_tree if child.is_dir() else _copy_file
    copy(child, os.path.join(dst, child.name), os.path.join(stamps, child.name))


def _version(src: epath.Path) -> str:
  """What changes whenever the remote file `src` is written: its object generation (Cloud
  Storage), else its ETag or checksum, with its size."""
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, rel = fsspec.core.url_to_fs(os.fspath(src))
  info = fs.info(rel)
  for key in ('generation', 'ETag', 'etag', 'md5Hash', 'crc32c', 'mtime', 'updated'):
    if info.get(key):
      return f'{key}={info[key]} size={info.get("size")}'
  return f'size={info.get("size")}'


def _copy_file(src: epath.Path, dst: str, stamp: str) -> None:
  """Copies remote `src` to local `dst` unless the copy there is of the same version
  (`_version`, recorded in the file `stamp`)."""
  version = _version(src)
  if os.path.exists(dst) and os.path.exists(stamp):
    with open(stamp) as f:
      if f.read() == version:
        return
  for d in (os.path.dirname(dst), os.path.dirname(stamp)):
    os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.part.', dir=os.path.dirname(dst))
  try:
    with os.fdopen(fd, 'wb') as out, src.open('rb') as f:
      while chunk := f.read(16 << 20):
        out.write(chunk)
    os.replace(tmp, dst)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  with open(stamp, 'w') as f:
    f.write(version)


def upload_tree(local_dir: str, p: PathLike) -> None:
  """Copies the local directory `local_dir` into `p` (a URI or a local path), file by file."""
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    for f in files:
      target = join(p, f) if rel == '.' else join(p, *rel.split(os.sep), f)
      with open(os.path.join(root, f), 'rb') as src:
        write_bytes(target, src.read())
