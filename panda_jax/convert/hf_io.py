"""Streaming readers for Hugging Face-style checkpoint directories, without torch.

A 7B Llama / Video-Panda checkpoint is ~14 GB in bf16, so conversion must never hold all of it:
`iter_tensors` walks the checkpoint shard by shard and tensor by tensor: safetensors tensors are
read one at a time, `.bin` tensors are, wherever the format allows, read-only views of a memory
map of the file (the OS pages data in as it is touched and can drop it again), so host memory
stays around one shard at most.

Formats:
  * safetensors (single file or sharded with `model.safetensors.index.json`), read and written
    by the `safetensors` package's numpy API (`safe_open` reads one tensor at a time).
  * PyTorch `.bin` (single or sharded with `pytorch_model.bin.index.json`) in the zip format that
    `torch.save` writes since torch 1.6: `<archive>/data.pkl` is a pickle whose tensors are
    `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls on storages that
    are pickled as persistent ids `('storage', storage_type, key, location, numel)`, the bytes of
    storage `key` being the zip entry `<archive>/data/<key>`. The pickle is read by a restricted
    unpickler that, like `torch.load(weights_only=True)`, only resolves the handful of globals a
    plain state dict needs and refuses everything else before anything can be called.

Only little-endian hosts are supported for bf16 / fp8 data (every machine we run on is).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import math
import mmap
import os
import tempfile
import pathlib
import pickle
import struct
import sys
import zipfile
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

PathLike = str | os.PathLike

SAFETENSORS_INDEX = 'model.safetensors.index.json'
SAFETENSORS_SINGLE = 'model.safetensors'
BIN_INDEX = 'pytorch_model.bin.index.json'
BIN_SINGLE = 'pytorch_model.bin'
ACCEPTED = (f'{SAFETENSORS_INDEX} (+ its shards), {SAFETENSORS_SINGLE}, exactly one *.safetensors, '
            f'{BIN_INDEX} (+ its shards), {BIN_SINGLE}')

class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read; the message names the file."""


class UnsafePickleError(CheckpointError):
  """A `.bin` pickle that asks for something a plain state dict never needs (e.g. `os.system`)."""


# ------------------------------------------------------------------------------------ dtypes

# safetensors dtype name -> numpy dtype (explicitly little-endian where numpy has byte orders).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype('<f8'),
    'F32': np.dtype('<f4'),
    'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
    'I64': np.dtype('<i8'),
    'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'),
    'I8': np.dtype('i1'),
    'U64': np.dtype('<u8'),
    'U32': np.dtype('<u4'),
    'U16': np.dtype('<u2'),
    'U8': np.dtype('u1'),
    'BOOL': np.dtype('bool'),
}

# The legacy typed storage classes `torch.save` names in its persistent ids -> element dtype.
TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {
    'DoubleStorage': SAFETENSORS_DTYPES['F64'],
    'FloatStorage': SAFETENSORS_DTYPES['F32'],
    'HalfStorage': SAFETENSORS_DTYPES['F16'],
    'BFloat16Storage': SAFETENSORS_DTYPES['BF16'],
    'LongStorage': SAFETENSORS_DTYPES['I64'],
    'IntStorage': SAFETENSORS_DTYPES['I32'],
    'ShortStorage': SAFETENSORS_DTYPES['I16'],
    'CharStorage': SAFETENSORS_DTYPES['I8'],
    'ByteStorage': SAFETENSORS_DTYPES['U8'],
    'BoolStorage': SAFETENSORS_DTYPES['BOOL'],
}

# Dtypes without a numpy byte order; their raw bytes are only right on a little-endian host.
_ORDERLESS = {'BF16', 'F8_E4M3', 'F8_E5M2'}


def _safetensors_name(dtype: np.dtype) -> str:
  """numpy dtype (any byte order) -> safetensors dtype name."""
  if dtype.byteorder == '>' or (dtype.byteorder == '=' and sys.byteorder == 'big'):
    dtype = dtype.newbyteorder('<')
  for name, dt in SAFETENSORS_DTYPES.items():
    if dtype == dt:
      return name
  raise CheckpointError(f'dtype {dtype} cannot be stored in safetensors; supported: '
                        + ', '.join(str(d) for d in SAFETENSORS_DTYPES.values()))


def _check_host(dtype_name: str, what: str) -> None:
  if dtype_name in _ORDERLESS and sys.byteorder != 'little':
    raise CheckpointError(f'{what}: {dtype_name} data needs a little-endian host')


# ------------------------------------------------------------------------------------ files

def _map_file(path: pathlib.Path) -> np.ndarray:
  """The whole file as a read-only uint8 array backed by a memory map (no data is read yet).

  Arrays sliced / viewed from it keep the map alive; it is unmapped when the last one goes.
  """
  with open(path, 'rb') as f:
    if os.fstat(f.fileno()).st_size == 0:
      return np.zeros(0, np.uint8)
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  return np.frombuffer(mm, dtype=np.uint8)


def read_config(directory: PathLike) -> dict:
  """Loads `directory/config.json` as a dict."""
  path = pathlib.Path(directory) / 'config.json'
  try:
    text = path.read_text(encoding='utf-8')
  except FileNotFoundError:
    raise CheckpointError(f'{path}: no config.json in the checkpoint directory') from None
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read config.json ({e})') from e
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: invalid JSON ({e})') from e
  if not isinstance(config, dict):
    raise CheckpointError(f'{path}: expected a JSON object, got {type(config).__name__}')
  return config


def _read_index(path: pathlib.Path) -> dict[str, str]:
  """The `weight_map` (tensor name -> shard file name) of a sharded checkpoint's index."""
  try:
    index = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{path}: cannot read the shard index ({e})') from e
  weight_map = index.get('weight_map') if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise CheckpointError(f'{path}: the index has no "weight_map" of tensor name -> file name')
  for shard in set(weight_map.values()):
    p = pathlib.PurePosixPath(shard)
    if p.is_absolute() or '..' in p.parts or '\\' in shard or not shard:
      raise CheckpointError(f'{path}: shard name {shard!r} points outside the checkpoint directory')
  return weight_map


def _resolve(directory: PathLike
             ) -> tuple[list[pathlib.Path], dict[pathlib.Path, set[str]] | None]:
  """The checkpoint's data files and, for a sharded checkpoint, which tensors each one holds."""
  d = pathlib.Path(directory)
  if d.is_file():  # a single data file given directly
    if d.suffix in ('.safetensors', '.bin'):
      return [d], None
    raise CheckpointError(f'{d}: not a checkpoint file; accepted: *.safetensors, *.bin or a '
                          f'directory holding {ACCEPTED}')
  if not d.is_dir():
    raise CheckpointError(f'{d}: no such checkpoint directory')

  def sharded(index_name: str) -> tuple[list[pathlib.Path], dict[pathlib.Path, set[str]]]:
    index_path = d / index_name
    shards = sorted(set(_read_index(index_path).items()), key=lambda kv: kv[1])
    held: dict[pathlib.Path, set[str]] = {}
    for name, shard in shards:
      held.setdefault(d / shard, set()).add(name)
    missing = [str(f.relative_to(d)) for f in held if not f.is_file()]
    if missing:
      raise CheckpointError(f'{index_path} names shard(s) that are not in {d}: '
                            + ', '.join(missing))
    return list(held), held

  if (d / SAFETENSORS_INDEX).is_file():
    return sharded(SAFETENSORS_INDEX)
  if (d / SAFETENSORS_SINGLE).is_file():
    return [d / SAFETENSORS_SINGLE], None
  singles = sorted(p for p in d.glob('*.safetensors') if p.is_file())
  if len(singles) == 1:
    return singles, None
  if (d / BIN_INDEX).is_file():
    return sharded(BIN_INDEX)
  if (d / BIN_SINGLE).is_file():
    return [d / BIN_SINGLE], None

  found = sorted(p.name for p in d.iterdir())
  shown = ', '.join(found[:30]) + (f', ... ({len(found)} in all)' if len(found) > 30 else '')
  hint = ''
  if len(singles) > 1:
    hint = f' ({len(singles)} *.safetensors files but no {SAFETENSORS_INDEX} to say which is which)'
  elif any(p.endswith(('.pt', '.pth', '.ckpt')) for p in found):
    hint = (' (.pt/.pth/.ckpt files are not read: if one is a plain torch.save state dict, '
            f'rename it to {BIN_SINGLE})')
  raise CheckpointError(f'{d}: no checkpoint weights found{hint}; found: {shown or "nothing"}; '
                        f'accepted: {ACCEPTED}')


def checkpoint_files(directory: PathLike) -> list[pathlib.Path]:
  """The data files of a checkpoint directory, by order of preference.

  1. `model.safetensors.index.json`: its `weight_map`'s files, deduplicated, sorted;
  2. `model.safetensors`;  3. the only `*.safetensors` file, if there is exactly one;
  4. `pytorch_model.bin.index.json` (as 1);  5. `pytorch_model.bin`.
  Anything else raises a `CheckpointError` (a `ValueError`) listing what was found and what is
  accepted; an index naming a missing shard raises one naming the shard.
  """
  return _resolve(directory)[0]


# ------------------------------------------------------------------------------ safetensors

def _open_safetensors(path: pathlib.Path):
  """The `safetensors` package's lazy reader; its errors become CheckpointErrors naming `path`."""
  try:
    return safetensors.safe_open(str(path), framework='numpy')
  except (safetensors.SafetensorError, OSError) as e:
    raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e


def _iter_safetensors(path: pathlib.Path, names: frozenset[str] | None
                      ) -> Iterator[tuple[str, np.ndarray]]:
  with _open_safetensors(path) as f:
    for name in f.keys():
      if names is None or name in names:
        try:
          yield name, f.get_tensor(name)
        except safetensors.SafetensorError as e:
          raise CheckpointError(f'{path}: tensor {name!r} cannot be read ({e})') from e


def safetensors_metadata(path: PathLike) -> dict[str, str]:
  """The `__metadata__` of a safetensors file ({} when it has none)."""
  with _open_safetensors(pathlib.Path(path)) as f:
    return dict(f.metadata() or {})


def save_safetensors(path: PathLike, tensors: Mapping[str, Any],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` ({name: array}) as a safetensors file (`safetensors.numpy.save_file`) to a
  temporary name, then renames it; any byte order is stored little-endian."""
  path = pathlib.Path(path)
  arrays = {}
  for name, value in tensors.items():
    if not isinstance(name, str) or name == '__metadata__':
      raise CheckpointError(f'{path}: bad tensor name {name!r}')
    arr = np.asarray(value)
    dtype_name = _safetensors_name(arr.dtype)
    _check_host(dtype_name, f'{path}: {name}')
    arrays[name] = np.ascontiguousarray(arr, dtype=SAFETENSORS_DTYPES[dtype_name]).reshape(
        arr.shape)
  if metadata and not all(isinstance(k, str) and isinstance(v, str)
                          for k, v in metadata.items()):
    raise CheckpointError(f'{path}: safetensors metadata must map str -> str')
  tmp = path.with_name(path.name + '.tmp')
  safetensors.numpy.save_file(arrays, str(tmp), metadata=dict(metadata) if metadata else None)
  os.replace(tmp, path)


def write_safetensors(path: PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """`save_safetensors` to a local or remote (`gs://`) path: a remote file is written locally
  first, then uploaded through `panda_jax.storage`."""
  from panda_jax import storage
  if not storage.is_remote(path):
    save_safetensors(storage.path(path), tensors, metadata)
    return
  with tempfile.TemporaryDirectory(prefix='safetensors-') as tmp:
    local = os.path.join(tmp, 'file.safetensors')
    save_safetensors(local, tensors, metadata)
    with open(local, 'rb') as f:
      storage.write_bytes(path, f.read())


# ------------------------------------------------------------------------- torch .bin (zip)

class _TorchArchive:
  """A `torch.save` zip archive: its pickle and its storages as (memory-mapped) byte arrays."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    if not zipfile.is_zipfile(path):
      raise CheckpointError(
          f'{path}: not a zip archive, so not a torch.save file from torch >= 1.6 (the legacy '
          'tar/pickle format is not supported): re-save it with a recent torch or convert it to '
          'safetensors')
    with zipfile.ZipFile(path) as zf:
      self.entries = {info.filename: info for info in zf.infolist()}
      pickles = [n for n in self.entries if n.endswith('/data.pkl') and n.count('/') == 1]
      if len(pickles) != 1:
        raise CheckpointError(f'{path}: a zip, but not a torch.save archive (expected one '
                              f'<archive>/data.pkl, found {len(pickles)})')
      self.prefix = pickles[0][:-len('data.pkl')]
      self.pickle_bytes = zf.read(pickles[0])
      byteorder = self.entries.get(self.prefix + 'byteorder')
      # Archives from before torch wrote `byteorder` are little-endian in practice.
      self.byteorder = zf.read(byteorder).decode().strip() if byteorder else 'little'
    if self.byteorder not in ('little', 'big'):
      raise CheckpointError(f'{path}: unknown byteorder {self.byteorder!r}')
    self._file: np.ndarray | None = None

  def storage_bytes(self, key: str) -> np.ndarray:
    """Storage `key`'s raw bytes: a view of the file when stored uncompressed (as torch does)."""
    info = self.entries.get(f'{self.prefix}data/{key}')
    if info is None:
      raise CheckpointError(f'{self.path}: storage {key!r} is missing from the archive')
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
      with zipfile.ZipFile(self.path) as zf:  # not written by torch; read it normally
        return np.frombuffer(zf.read(info), np.uint8)
    if self._file is None:
      self._file = _map_file(self.path)
    # Local file header: 30 fixed bytes, then the name and the extra field, then the data.
    local = self._file[info.header_offset:info.header_offset + 30].tobytes()
    if len(local) != 30 or local[:4] != b'PK\x03\x04':
      raise CheckpointError(f'{self.path}: corrupt zip entry for storage {key!r}')
    name_len, extra_len = struct.unpack('<HH', local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > self._file.size:
      raise CheckpointError(f'{self.path}: storage {key!r} runs past the end of the file')
    return self._file[start:start + info.file_size]


class _StorageType:
  """Stand-in for a torch storage class (`torch.FloatStorage`, ...): just its element dtype."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __setstate__(self, state):
    raise UnsafePickleError('the pickle tries to set state on a storage type')


class _Storage:
  """A storage named by a persistent id; its bytes are only touched when a tensor is built."""

  def __init__(self, archive: _TorchArchive, key: str, dtype: np.dtype, numel: int):
    self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel

  def elements(self) -> np.ndarray:
    raw = self.archive.storage_bytes(self.key)
    need = self.numel * self.dtype.itemsize
    if raw.size < need:
      raise CheckpointError(f'{self.archive.path}: storage {self.key!r} has {raw.size} bytes, '
                            f'its {self.numel} x {self.dtype} elements need {need}')
    elems = raw[:need].view(self.dtype)
    if self.archive.byteorder != sys.byteorder:
      elems = elems.byteswap()  # a copy in native order
    return elems

  def __setstate__(self, state):
    raise UnsafePickleError('the pickle tries to set state on a storage')


class LazyTorchTensor:
  """What `_rebuild_tensor_v2` returns: a strided view description, materialised on demand."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __setstate__(self, state):
    raise UnsafePickleError('the pickle tries to set state on a tensor')

  def numpy(self) -> np.ndarray:
    """The tensor as a numpy array: a read-only view when contiguous, else a contiguous copy."""
    elems = self.storage.elements()
    size, stride, offset = self.size, self.stride, self.offset
    if math.prod(size) == 0:
      return np.zeros(size, self.storage.dtype)
    # Bounds check before as_strided, which would otherwise read whatever memory follows.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= elems.size:
      raise CheckpointError(
          f'{self.storage.archive.path}: a tensor of size {size}, stride {stride}, offset '
          f'{offset} reaches element {last} of storage {self.storage.key!r}, which has '
          f'{elems.size}')
    contiguous = tuple(int(math.prod(size[i + 1:])) for i in range(len(size)))
    if all(s == c for n, s, c in zip(size, stride, contiguous) if n > 1):
      return elems[offset:offset + math.prod(size)].reshape(size)
    item = elems.itemsize
    view = np.lib.stride_tricks.as_strided(elems[offset:], shape=size,
                                           strides=[s * item for s in stride], writeable=False)
    return view.copy(order='C')


def _ints(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
    raise CheckpointError(f'bad tensor {what} {value!r} in the pickle')
  return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> LazyTorchTensor:
  """Our `torch._utils._rebuild_tensor_v2`: checks the arguments, records the view."""
  del requires_grad, backward_hooks, metadata  # meaningless for weights
  if not isinstance(storage, _Storage):
    raise UnsafePickleError('_rebuild_tensor_v2 called on something that is not a storage')
  if type(storage_offset) is not int or storage_offset < 0:
    raise CheckpointError(f'bad tensor storage offset {storage_offset!r} in the pickle')
  size, stride = _ints(size, 'size'), _ints(stride, 'stride')
  if len(size) != len(stride):
    raise CheckpointError(f'tensor size {size} and stride {stride} differ in length')
  return LazyTorchTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None,
                       state=None) -> LazyTorchTensor:
  """Our `torch._utils._rebuild_parameter(_with_state)`: a Parameter is just its data here."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, LazyTorchTensor):
    raise UnsafePickleError('_rebuild_parameter called on something that is not a tensor')
  return data


def _codecs_encode(obj, encoding='utf-8', errors='strict') -> bytes:
  """Protocol 2 pickles bytes as `_codecs.encode(str, 'latin1')`; allow exactly that."""
  if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1') or errors != 'strict':
    raise UnsafePickleError(f'_codecs.encode with {encoding!r} is not allowed')
  return obj.encode('latin1')


# The only globals a state-dict pickle may name, as 'module.name' -> what they resolve to.
_ALLOWED_GLOBALS: dict[str, Any] = {
    'collections.OrderedDict': collections.OrderedDict,
    'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
    'torch._utils._rebuild_parameter': _rebuild_parameter,
    'torch._utils._rebuild_parameter_with_state': _rebuild_parameter,
    '_codecs.encode': _codecs_encode,
    'torch.UntypedStorage': _StorageType('UntypedStorage', np.dtype('u1')),
    'torch.storage.UntypedStorage': _StorageType('UntypedStorage', np.dtype('u1')),
    **{f'torch.{name}': _StorageType(name, dt) for name, dt in TORCH_STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a state dict with a fixed allow-list of globals (cf. torch's weights_only)."""

  def __init__(self, file, archive: _TorchArchive):
    super().__init__(file)
    self.archive = archive
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    # Called for every GLOBAL / STACK_GLOBAL / INST / OBJ / EXT opcode: nothing outside the
    # allow-list is ever imported, let alone called.
    qualified = f'{module}.{name}'
    if qualified in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[qualified]
    # Protocol-2 pickles spell some Python 3 names the Python 2 way (`__builtin__.exec`); name
    # both in the message.
    py3 = _compat_pickle.NAME_MAPPING.get((module, name))
    py3 = py3 or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    also = f' (= {".".join(py3)})' if '.'.join(py3) != qualified else ''
    raise UnsafePickleError(
        f'{self.archive.path}: refusing to load: the pickle references {qualified}{also}, which a '
        'plain state dict never needs (allowed: ' + ', '.join(sorted(_ALLOWED_GLOBALS)) + ')')

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise UnsafePickleError(f'{self.archive.path}: unexpected persistent id {pid!r:.200}')
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise UnsafePickleError(f'{self.archive.path}: persistent id with storage type '
                              f'{storage_type!r:.100}')
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
      raise CheckpointError(f'{self.archive.path}: bad storage id {pid!r:.200}')
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(self.archive, key, storage_type.dtype, numel)
    elif storage.dtype != storage_type.dtype:
      raise CheckpointError(f'{self.archive.path}: storage {key!r} is used as both '
                            f'{storage.dtype} and {storage_type.dtype}')
    return storage


def _flatten_state(obj: Any, prefix: str, out: dict[str, LazyTorchTensor],
                   path: pathlib.Path) -> None:
  """Collects the tensors of a (possibly nested) state dict; other values are ignored."""
  if isinstance(obj, LazyTorchTensor):
    out[prefix[:-1]] = obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      if not isinstance(k, str):
        raise CheckpointError(f'{path}: state dict key {k!r} is not a string')
      _flatten_state(v, f'{prefix}{k}.', out, path)


def load_torch_state(path: PathLike) -> dict[str, LazyTorchTensor]:
  """Unpickles a `torch.save` zip archive safely into {name: lazy tensor} (no tensor data read).

  Call `.numpy()` on a value to get its array. Nested dicts are flattened with '.'.
  """
  path = pathlib.Path(path)
  archive = _TorchArchive(path)
  try:
    root = _RestrictedUnpickler(io.BytesIO(archive.pickle_bytes), archive).load()
  except CheckpointError:
    raise
  except Exception as e:  # a truncated or otherwise broken pickle
    raise CheckpointError(f'{path}: cannot unpickle {archive.prefix}data.pkl '
                          f'({type(e).__name__}: {e})') from e
  if not isinstance(root, dict):
    raise CheckpointError(f'{path}: expected a state dict, the pickle holds a '
                          f'{type(root).__name__}')
  out: dict[str, LazyTorchTensor] = {}
  _flatten_state(root, '', out, path)
  return out


def _iter_torch_bin(path: pathlib.Path, names: frozenset[str] | None
                    ) -> Iterator[tuple[str, np.ndarray]]:
  for name, tensor in load_torch_state(path).items():
    if names is None or name in names:
      yield name, tensor.numpy()


# ------------------------------------------------------------------------------------ reader

def _iter_file(path: pathlib.Path, names: frozenset[str] | None
               ) -> Iterator[tuple[str, np.ndarray]]:
  if path.suffix == '.safetensors':
    return _iter_safetensors(path, names)
  return _iter_torch_bin(path, names)


def iter_tensors(directory: PathLike, names: Iterable[str] | None = None
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(name, array)` for the tensors of a checkpoint, one shard after another.

  `directory` is resolved with `checkpoint_files` (a single `.safetensors` / `.bin` file path is
  accepted too). With `names`, only those tensors are read, and shards the index says hold none
  of them are not opened. `.bin` arrays are read-only views of a memory map where possible
  (contiguous tensors); copy one before writing to it. For a sharded
  checkpoint, a tensor the index places in a shard that lacks it raises a `CheckpointError`.
  """
  files, held = _resolve(directory)
  wanted = None if names is None else frozenset(names)
  for path in files:
    expected: set[str] | None = None
    if held is not None:  # sharded: the index says what to find here
      expected = held[path] if wanted is None else held[path] & wanted
      if not expected:
        continue
    seen = set()
    for name, arr in _iter_file(path, wanted):
      seen.add(name)
      yield name, arr
    if expected and expected - seen:
      missing = sorted(expected - seen)
      raise CheckpointError(f'{path}: the index places these tensors in this shard, but it lacks '
                            f'them: ' + ', '.join(missing[:20]) +
                            (f', ... ({len(missing)} in all)' if len(missing) > 20 else ''))


def load_tensors(directory: PathLike, names: Iterable[str] | None = None
                 ) -> dict[str, np.ndarray]:
  """`dict(iter_tensors(...))`: convenient for small checkpoints or a few names."""
  return dict(iter_tensors(directory, names))

