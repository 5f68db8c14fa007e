"""Checkpoint readers: safetensors (through the `safetensors` package), torch zip .bin written here in
torch's format without torch, shard indexes, refusal of unsafe pickles, and directory errors."""

import collections
import json
import pathlib
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from panda_jax.convert import hf_io
from panda_jax.convert.hf_io import CheckpointError, UnsafePickleError

BF16 = ml_dtypes.bfloat16


def _assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k, w in want.items():
    g = got[k]
    assert g.dtype == w.dtype, k
    assert g.shape == w.shape, k
    np.testing.assert_array_equal(g.view(np.uint8) if g.ndim else g, w.view(np.uint8) if w.ndim
                                  else w, err_msg=k)


def _sample() -> dict:
  rng = np.random.default_rng(0)
  return {
      'f32': rng.standard_normal((3, 5)).astype(np.float32),
      'f16': rng.standard_normal((4,)).astype(np.float16),
      'bf16': rng.standard_normal((2, 3, 2)).astype(BF16),
      'i64': np.array([-(2**62), 0, 7, 2**62 + 3], np.int64),
      'scalar': np.array(3.25, np.float32),
      'scalar_bf16': np.array(-1.5, BF16),
      'empty': np.zeros((0, 4), np.float16),
      'i32': np.arange(6, dtype=np.int32).reshape(2, 3),
      'u8': np.arange(5, dtype=np.uint8),
      'mask': np.array([True, False, True]),
  }


# ---------------------------------------------------------------------------- safetensors

def test_safetensors_round_trip(tmp_path):
  want = _sample()
  hf_io.save_safetensors(tmp_path / 'model.safetensors', want, metadata={'format': 'np'})
  got = dict(hf_io.iter_tensors(tmp_path))
  _assert_same(got, want)
  assert got['bf16'].dtype == np.dtype(BF16)
  assert hf_io.safetensors_metadata(tmp_path / 'model.safetensors') == {'format': 'np'}
  assert not list(tmp_path.glob('*.tmp'))
  with pytest.raises(CheckpointError, match='complex64 cannot be stored'):
    hf_io.save_safetensors(tmp_path / 'c.safetensors', {'c': np.zeros(2, np.complex64)})
  with pytest.raises(CheckpointError, match='metadata must map str -> str'):
    hf_io.save_safetensors(tmp_path / 'c.safetensors', {'a': want['f32']}, metadata={'a': 1})


def test_safetensors_interoperates_with_the_package(tmp_path):
  from safetensors.numpy import load_file, save_file
  want = {k: v for k, v in _sample().items() if k in ('f32', 'f16', 'i64', 'scalar', 'empty')}
  save_file(want, str(tmp_path / 'theirs.safetensors'), metadata={'a': 'b'})
  _assert_same(dict(hf_io.iter_tensors(tmp_path / 'theirs.safetensors')), want)
  hf_io.save_safetensors(tmp_path / 'ours.safetensors', want, metadata={'a': 'b'})
  _assert_same(load_file(str(tmp_path / 'ours.safetensors')), want)


def test_safetensors_big_endian_input_is_stored_little_endian(tmp_path):
  a = np.arange(4, dtype='>f4')
  hf_io.save_safetensors(tmp_path / 'x.safetensors', {'a': a})
  got = dict(hf_io.iter_tensors(tmp_path / 'x.safetensors'))['a']
  np.testing.assert_array_equal(got, a)


def test_safetensors_corrupt_header_is_reported(tmp_path):
  path = tmp_path / 'model.safetensors'
  hf_io.save_safetensors(path, {'a': np.zeros(3, np.float32)})
  raw = bytearray(path.read_bytes())
  raw[:8] = struct.pack('<Q', 10**9)
  path.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match='model.safetensors: not a readable safetensors'):
    list(hf_io.iter_tensors(tmp_path))
  header = json.dumps({'a': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 12]}}).encode()
  path.write_bytes(struct.pack('<Q', len(header)) + header + bytes(12))
  with pytest.raises(CheckpointError, match='model.safetensors: not a readable.*offset'):
    list(hf_io.iter_tensors(tmp_path))
  path.write_bytes(b'abc')
  with pytest.raises(CheckpointError, match='not a readable safetensors file'):
    list(hf_io.iter_tensors(tmp_path))


def _sharded(tmp_path: pathlib.Path) -> dict:
  want = _sample()
  names = sorted(want)
  shards = {'model-00001-of-00002.safetensors': names[:5],
            'model-00002-of-00002.safetensors': names[5:]}
  for shard, keys in shards.items():
    hf_io.save_safetensors(tmp_path / shard, {k: want[k] for k in keys})
  index = {'metadata': {'total_size': 0},
           'weight_map': {k: s for s, keys in shards.items() for k in keys}}
  (tmp_path / hf_io.SAFETENSORS_INDEX).write_text(json.dumps(index))
  return want


def test_sharded_safetensors(tmp_path):
  want = _sharded(tmp_path)
  assert [p.name for p in hf_io.checkpoint_files(tmp_path)] == [
      'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
  _assert_same(dict(hf_io.iter_tensors(tmp_path)), want)
  picked = {'bf16', 'u8', 'not_there'}
  _assert_same(hf_io.load_tensors(tmp_path, names=picked), {k: want[k] for k in ('bf16', 'u8')})


def test_sharded_safetensors_missing_shard_is_named(tmp_path):
  _sharded(tmp_path)
  (tmp_path / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(CheckpointError, match='model-00002-of-00002.safetensors'):
    hf_io.checkpoint_files(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
  _sharded(tmp_path)
  index = json.loads((tmp_path / hf_io.SAFETENSORS_INDEX).read_text())
  index['weight_map']['ghost'] = 'model-00001-of-00002.safetensors'
  (tmp_path / hf_io.SAFETENSORS_INDEX).write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match='ghost'):
    list(hf_io.iter_tensors(tmp_path))


# ------------------------------------------------------------- torch .bin, written without torch

class _Global:
  """A reference to a torch global (by module and name) that pickles as a GLOBAL opcode."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle insists that a REDUCE function be callable
    raise AssertionError('never called')


REBUILD = _Global('torch._utils', '_rebuild_tensor_v2')
STORAGE = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
           np.dtype(BF16): 'BFloat16Storage', np.dtype(np.int64): 'LongStorage',
           np.dtype(np.int32): 'IntStorage', np.dtype(np.uint8): 'ByteStorage',
           np.dtype(bool): 'BoolStorage', np.dtype(np.float64): 'DoubleStorage'}


class _Storage:
  def __init__(self, key: str, data: np.ndarray):
    self.key, self.data = key, np.ascontiguousarray(data).reshape(-1)


class _Tensor:
  """Pickles exactly as torch's Tensor.__reduce_ex__ does for a plain CPU tensor."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def __reduce_ex__(self, protocol):
    return REBUILD, (self.storage, self.offset, self.size, self.stride, False,
                     collections.OrderedDict())


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
  dispatch = dict(pickle._Pickler.dispatch)

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      kind = _Global('torch', STORAGE[obj.data.dtype])
      return ('storage', kind, obj.key, 'cpu', obj.data.size)
    return None

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global


def _write_torch_zip(path: pathlib.Path, state, storages, archive='archive',
                     byteorder='little') -> None:
  """torch.save's zip layout: data.pkl (protocol 2), byteorder, data/<key>, version."""
  import io
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(state)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{archive}/data.pkl', buf.getvalue())
    zf.writestr(f'{archive}/byteorder', byteorder.encode())
    for s in storages:
      data = s.data.byteswap() if byteorder == 'big' else s.data
      zf.writestr(f'{archive}/data/{s.key}', data.tobytes())
    zf.writestr(f'{archive}/version', b'3\n')


def _torch_state():
  """A state dict with views torch would produce, and the arrays they must read back as."""
  rng = np.random.default_rng(1)
  base = rng.standard_normal((4, 3)).astype(np.float32)  # stored [4, 3]; `w_t` is its .T
  flat = np.arange(10, dtype=np.float32) * 0.5
  s_base, s_flat = _Storage('0', base), _Storage('1', flat)
  s_bf = _Storage('2', rng.standard_normal((2, 2)).astype(BF16))
  s_i64 = _Storage('3', np.array([1, -2, 2**40, 5, 9], np.int64))
  s_f16 = _Storage('4', np.array([0.125, 7.0], np.float16))
  s_bool = _Storage('5', np.array([True, False, False]))
  state = collections.OrderedDict([
      ('w', _Tensor(s_base, 0, (4, 3), (3, 1))),
      ('w_t', _Tensor(s_base, 0, (3, 4), (1, 3))),          # transposed view, same storage
      ('offset', _Tensor(s_flat, 2, (2, 3), (3, 1))),       # contiguous from an offset
      ('strided', _Tensor(s_flat, 1, (3,), (3,))),          # every third element from 1
      ('expanded', _Tensor(s_flat, 4, (2, 3), (0, 1))),     # stride 0, as from .expand()
      ('bf16', _Tensor(s_bf, 0, (2, 2), (2, 1))),
      ('i64', _Tensor(s_i64, 0, (5,), (1,))),
      ('scalar', _Tensor(s_f16, 1, (), ())),
      ('empty', _Tensor(s_f16, 0, (0, 3), (3, 1))),
      ('mask', _Tensor(s_bool, 0, (3,), (1,))),
  ])
  want = {
      'w': base, 'w_t': base.T.copy(), 'offset': flat[2:8].reshape(2, 3),
      'strided': flat[1::3].copy(), 'expanded': np.broadcast_to(flat[4:7], (2, 3)).copy(),
      'bf16': s_bf.data.reshape(2, 2), 'i64': s_i64.data, 'scalar': np.array(7.0, np.float16),
      'empty': np.zeros((0, 3), np.float16), 'mask': s_bool.data,
  }
  return state, [s_base, s_flat, s_bf, s_i64, s_f16, s_bool], want


def test_torch_bin_reads_back_exactly(tmp_path):
  state, storages, want = _torch_state()
  # As nn.Module.state_dict() sets; the bytes pickle as `_codecs.encode(..., 'latin1')`.
  state._metadata = collections.OrderedDict(version=1, blob=b'\x00\xff')
  _write_torch_zip(tmp_path / 'pytorch_model.bin', state, storages)
  assert hf_io.checkpoint_files(tmp_path) == [tmp_path / 'pytorch_model.bin']
  got = dict(hf_io.iter_tensors(tmp_path))
  assert list(got) == list(state)  # the pickle's order
  _assert_same(got, want)
  assert not got['w'].flags.writeable  # contiguous tensors are views of the memory map
  assert got['w_t'].flags.c_contiguous
  _assert_same(hf_io.load_tensors(tmp_path, names={'w_t', 'bf16'}),
               {'w_t': want['w_t'], 'bf16': want['bf16']})


def test_torch_bin_other_archive_name_and_big_endian(tmp_path):
  state, storages, want = _torch_state()
  _write_torch_zip(tmp_path / 'pytorch_model.bin', state, storages, archive='pytorch_model',
                   byteorder='big')
  _assert_same(dict(hf_io.iter_tensors(tmp_path)), want)


def test_sharded_torch_bin(tmp_path):
  state, storages, want = _torch_state()
  first = ['w', 'w_t', 'offset', 'bf16']
  shards = {'pytorch_model-00001-of-00002.bin': first,
            'pytorch_model-00002-of-00002.bin': [k for k in state if k not in first]}
  for shard, keys in shards.items():
    _write_torch_zip(tmp_path / shard, collections.OrderedDict((k, state[k]) for k in keys),
                     storages)
  index = {'weight_map': {k: s for s, keys in shards.items() for k in keys}}
  (tmp_path / hf_io.BIN_INDEX).write_text(json.dumps(index))
  assert [p.name for p in hf_io.checkpoint_files(tmp_path)] == sorted(shards)
  _assert_same(dict(hf_io.iter_tensors(tmp_path)), want)
  _assert_same(hf_io.load_tensors(tmp_path, names={'i64'}), {'i64': want['i64']})
  (tmp_path / 'pytorch_model-00001-of-00002.bin').unlink()
  with pytest.raises(CheckpointError, match='pytorch_model-00001-of-00002.bin'):
    list(hf_io.iter_tensors(tmp_path))


def test_out_of_bounds_view_is_refused(tmp_path):
  s = _Storage('0', np.arange(4, dtype=np.float32))
  _write_torch_zip(tmp_path / 'pytorch_model.bin', {'bad': _Tensor(s, 1, (2, 2), (1, 3))}, [s])
  with pytest.raises(CheckpointError, match='reaches element 5'):
    list(hf_io.iter_tensors(tmp_path))


def _malicious_zip(path: pathlib.Path, pkl: bytes) -> None:
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pkl)
    zf.writestr('archive/version', b'3\n')


def test_pickle_with_os_system_is_refused(tmp_path):
  marker = tmp_path / 'pwned'
  # GLOBAL os.system, the command as a unicode string, a 1-tuple, REDUCE.
  cmd = f'touch {marker}'.encode()
  pkl = (b'\x80\x02cos\nsystem\nX' + struct.pack('<I', len(cmd)) + cmd + b'\x85R.')
  _malicious_zip(tmp_path / 'pytorch_model.bin', pkl)
  with pytest.raises(UnsafePickleError, match=r'os\.system'):
    list(hf_io.iter_tensors(tmp_path))
  assert not marker.exists()


class _Evil:
  def __init__(self, code):
    self.code = code

  def __reduce__(self):
    return exec, (self.code,)


def test_pickle_with_exec_inside_a_state_dict_is_refused(tmp_path):
  marker = tmp_path / 'pwned'
  state, storages, _ = _torch_state()
  state['evil'] = _Evil(f'open({str(marker)!r}, "w").close()')
  _write_torch_zip(tmp_path / 'pytorch_model.bin', state, storages)
  with pytest.raises(ValueError, match=r'builtins\.exec'):
    list(hf_io.iter_tensors(tmp_path))
  assert not marker.exists()


def test_legacy_bin_is_refused_clearly(tmp_path):
  (tmp_path / 'pytorch_model.bin').write_bytes(pickle.dumps({'a': 1}, protocol=2))
  with pytest.raises(CheckpointError, match='legacy'):
    list(hf_io.iter_tensors(tmp_path))


# ------------------------------------------------------------------------ directories, config

def test_checkpoint_files_errors(tmp_path):
  with pytest.raises(ValueError, match='found: nothing.*accepted: model.safetensors.index.json'):
    hf_io.checkpoint_files(tmp_path)
  (tmp_path / 'consolidated.pt').write_bytes(b'x')
  with pytest.raises(ValueError, match=r'consolidated\.pt.*accepted:.*pytorch_model\.bin'):
    hf_io.checkpoint_files(tmp_path)
  with pytest.raises(ValueError, match='no such checkpoint directory'):
    hf_io.checkpoint_files(tmp_path / 'nope')


def test_checkpoint_files_preference(tmp_path):
  hf_io.save_safetensors(tmp_path / 'a.safetensors', {'x': np.zeros(1, np.float32)})
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  assert hf_io.checkpoint_files(tmp_path) == [tmp_path / 'a.safetensors']
  hf_io.save_safetensors(tmp_path / 'b.safetensors', {'x': np.zeros(1, np.float32)})
  assert hf_io.checkpoint_files(tmp_path) == [tmp_path / 'pytorch_model.bin']
  hf_io.save_safetensors(tmp_path / 'model.safetensors', {'x': np.zeros(1, np.float32)})
  assert hf_io.checkpoint_files(tmp_path) == [tmp_path / 'model.safetensors']
  (tmp_path / 'pytorch_model.bin').unlink()
  (tmp_path / 'model.safetensors').unlink()
  with pytest.raises(ValueError, match='2 \\*.safetensors files but no'):
    hf_io.checkpoint_files(tmp_path)


def test_read_config(tmp_path):
  with pytest.raises(ValueError, match=str(tmp_path / 'config.json')):
    hf_io.read_config(tmp_path)
  (tmp_path / 'config.json').write_text('{"hidden_size": 4096,')
  with pytest.raises(ValueError, match='invalid JSON'):
    hf_io.read_config(tmp_path)
  (tmp_path / 'config.json').write_text('{"hidden_size": 4096}')
  assert hf_io.read_config(tmp_path) == {'hidden_size': 4096}
