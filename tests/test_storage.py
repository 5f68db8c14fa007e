"""The storage layer (panda_jax.storage) on local paths and on gs:// URIs served by a Cloud
Storage emulator on loopback, through the real clients (gcsfs, TensorStore, google-cloud-cpp):
whole files, growing line files, listings, copies, errors that name the path; and the user
paths that read from a bucket: a tokenizer, converted weights (Orbax through TensorStore),
a packed data set (ArrayRecord). Training, resuming, evaluation and teacher features with a
gs:// workdir run in tests/test_topology.py (its two-process run writes into a bucket)."""

import json
import os

import numpy as np
import pytest

from panda_jax import storage


def test_whole_files_line_logs_and_listings_on_a_bucket_and_on_disk(gcs_bucket, tmp_path):
  for root in (f'{gcs_bucket}/layer', str(tmp_path / 'layer')):
    doc = storage.join(root, 'a', 'doc.json')
    assert not storage.exists(doc)
    storage.write_json(doc, {'x': [1, 2]})
    assert storage.read_json(doc) == {'x': [1, 2]}
    assert storage.isfile(doc) and not storage.isdir(doc)
    assert storage.isdir(storage.join(root, 'a')) and storage.listdir(root) == ['a']
    storage.write_text(doc, 'not json')
    with pytest.raises(ValueError, match=f'{doc} is not valid JSON'):
      storage.read_json(doc)

    # A line log: a resumed writer keeps what was there; a torn last line is closed.
    log = storage.join(root, 'm.jsonl')
    with storage.LineLog(log, interval_s=0) as f:
      f.append('{"step": 1}')
      assert storage.read_text(log) == '{"step": 1}\n'     # durable at once
    storage.write_text(log, storage.read_text(log) + '{"st')
    with storage.LineLog(log) as f:                        # a bucket: rewritten at close
      f.append('{"step": 2}')
    lines = storage.read_text(log).splitlines()
    assert lines[0] == '{"step": 1}' and lines[-1] == '{"step": 2}'

    storage.remove(doc)
    storage.remove(doc)                                   # missing_ok
    with pytest.raises(FileNotFoundError, match=f'cannot read {doc}'):
      storage.read_text(doc)

  # A remote tree copied into the local cache, reused while its files keep their sizes.
  storage.write_bytes(f'{gcs_bucket}/tree/sub/b.bin', b'\x00\x01' * 1000)
  storage.write_text(f'{gcs_bucket}/tree/c.txt', 'c')
  local = storage.local_copy(f'{gcs_bucket}/tree')
  assert local.startswith(storage.cache_root())
  with open(os.path.join(local, 'sub', 'b.bin'), 'rb') as f:
    assert f.read() == b'\x00\x01' * 1000
  assert open(os.path.join(local, 'c.txt')).read() == 'c'
  # Copied again when the remote file changes, even to the same size.
  storage.write_text(f'{gcs_bucket}/tree/c.txt', 'd')
  assert open(os.path.join(storage.local_copy(f'{gcs_bucket}/tree'), 'c.txt')).read() == 'd'
  assert sorted(os.listdir(local)) == ['c.txt', 'sub']     # nothing else among the copies
  assert storage.local_copy(str(tmp_path)) == str(tmp_path)


def test_paths_that_cannot_be_opened_are_named(gcs_bucket):
  with pytest.raises(FileNotFoundError, match='cannot read gs://no-such-bucket/x.json'):
    storage.read_json('gs://no-such-bucket/x.json')
  with pytest.raises(FileNotFoundError, match='cannot write gs://no-such-bucket/x.json'):
    storage.write_text('gs://no-such-bucket/x.json', 'x')
  with pytest.raises(FileNotFoundError, match=f'cannot copy {gcs_bucket}/nothing: no such'):
    storage.local_copy(f'{gcs_bucket}/nothing')
  with pytest.raises(ValueError, match="unsupported scheme 'ftp'"):
    storage.path('ftp://host/x')
  with pytest.raises(ValueError, match='mode=.a.; expected r, rb, w or wb'):
    with storage.open_file(f'{gcs_bucket}/x', 'a'):
      pass
  from panda_jax.data import text
  with pytest.raises(FileNotFoundError, match=f"tokenizer directory '{gcs_bucket}/no_tok'"):
    text.load_tokenizer(f'{gcs_bucket}/no_tok')


def test_a_tokenizer_and_converted_weights_read_from_a_bucket(gcs_bucket, tmp_path):
  import jax
  from panda_jax.convert.checkpoint import convert_directory, load_converted
  from panda_jax.data import text
  from test_checkpoint import CASE, _hf_config, _write_safetensors_shards
  from panda_jax import golden

  local_tok = text.build_tokenizer(str(tmp_path / 'tok'), ['a red circle moves left'] * 4)
  storage.upload_tree(local_tok, f'{gcs_bucket}/tok')
  ours, theirs = text.load_tokenizer(local_tok), text.load_tokenizer(f'{gcs_bucket}/tok')
  assert theirs('a red circle').input_ids == ours('a red circle').input_ids

  meta, params, *_ = golden.load_case(CASE)
  src = tmp_path / 'released'
  src.mkdir()
  (src / 'config.json').write_text(json.dumps(_hf_config(meta)))
  _write_safetensors_shards(src, dict(params))
  dst = f'{gcs_bucket}/converted'
  cfg = convert_directory(src, dst, llm_dtype='float32', image_size=224)
  assert storage.isfile(f'{dst}/panda_config.json') and storage.isdir(f'{dst}/variables')
  name, cfg2, variables = load_converted(dst)
  assert name == 'video_panda' and cfg2 == cfg
  convert_directory(src, tmp_path / 'conv', llm_dtype='float32', image_size=224)
  _, _, here = load_converted(tmp_path / 'conv')
  flat = jax.tree_util.tree_leaves_with_path(here)
  remote = dict(jax.tree_util.tree_leaves_with_path(variables))
  assert len(flat) == len(remote) > 50
  for k, v in flat:
    np.testing.assert_array_equal(np.asarray(remote[k]), np.asarray(v))
  with pytest.raises(FileExistsError, match=f'{dst}/variables already exists'):
    convert_directory(src, dst, llm_dtype='float32', image_size=224)


def test_a_packed_set_reads_from_a_bucket_as_from_disk(gcs_bucket, tmp_path):
  from panda_jax.data import packing, synthetic
  ds = synthetic.make_dataset(str(tmp_path / 'syn'), 4, seed=0, width=64, height=48, fps=8,
                              duration_s=1.0, eval_fraction=0)
  manual = tmp_path / 'manual' / 'videochatgpt'
  manual.mkdir(parents=True)
  os.symlink(os.path.join(ds.root, 'videos'), manual / 'videos')
  (manual / 'annotations.json').write_text(open(ds.train_instruct).read())
  packing.build(str(tmp_path / 'manual'), str(tmp_path / 'packed'), 'videochatgpt', frames=4)
  storage.upload_tree(str(tmp_path / 'packed'), f'{gcs_bucket}/packed')
  local = packing.open_packed(str(tmp_path / 'packed'), 'videochatgpt_4f_png')
  remote = packing.open_packed(f'{gcs_bucket}/packed', 'videochatgpt_4f_png')
  assert len(remote) == len(local) == 4
  for i in range(len(local)):
    a, b = packing.as_record(local[i]), packing.as_record(remote[i])
    assert a.keys() == b.keys()
    for k in a:
      assert np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k], k
  with pytest.raises(packing.PackingError, match=f'no packed data set .valley. under '
                                                 f'{gcs_bucket}/packed'):
    packing.open_packed(f'{gcs_bucket}/packed', 'valley')
