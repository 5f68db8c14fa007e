"""Shared fixtures: tiny STAB configurations and their compiled functions."""

import os
import sys

# Tests run on the CPU; a few sharding tests need several fake devices, which must be set up
# before JAX initialises its backend.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# The suite's time is XLA:CPU compiling tiny programs that then run a few steps in well under a
# second: LLVM at optimisation level 0 compiles them about twice as fast (the tiny train step:
# 32 s -> 16 s of CPU) and runs them about as fast; XLA:CPU's older loop emitters instead of its
# MLIR fusion emitters (`xla_cpu_use_fusion_emitters=false`) compile them two to three times
# faster again (the tiny stage-2 step with gradients: 8.8 -> 3.2 s on one device, 10.2 -> 4.7 s
# on 8; tests/test_train_sharded.py 51 -> 27 s of CPU) and run them as fast. Results differ
# from the default build only in rounding; every exact comparison here is between programs
# compiled with the same flags (in this process and in its subprocesses: `subprocess_env`).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
if TEST_XLA_FLAGS not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] = f"{os.environ['XLA_FLAGS']} {TEST_XLA_FLAGS}".strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# Many tests compile the same programs (a probe run and a full run of one stage, stages with the
# same trainable set): a session-wide persistent cache compiles each once. Every program is
# written, however small: the processes the tests start share the small ones too.
# Under pytest-xdist (`-n 2`) the workers of one run share it (one directory per run id).
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID')
JAX_CACHE = (os.environ.get('PANDA_TEST_JAX_CACHE') or
             (os.path.join(tempfile.gettempdir(), f'jaxc-{_RUN}') if _RUN else
              tempfile.mkdtemp(prefix='jaxc-')))
os.makedirs(JAX_CACHE, exist_ok=True)
jax.config.update('jax_compilation_cache_dir', JAX_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import flax.linen as nn  # noqa: E402

from panda_jax.models.stab import StabConfig, VisualTokenizer  # noqa: E402


def subprocess_env(**extra):
  """The environment of a test's `python -m panda_jax...` subprocess: CPU, one device (unless
  `extra` sets XLA_FLAGS), this session's compiler flags and its compilation cache, so programs
  a subprocess shares with another (or with a run in this process) compile once."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.update(extra)
  env['XLA_FLAGS'] = f"{env['XLA_FLAGS']} {TEST_XLA_FLAGS}".strip()   # compiled as here
  return env


TINY = StabConfig(hidden=32, heads=4, llm_hidden=48, image_size=112, patch_size=14,
                  empty_frame_patches=4)


def random_video(key, batch, frames, cfg=TINY):
  return jax.random.normal(key, (batch, frames, cfg.image_size, cfg.image_size, 3))


def box_mask(batch, frames, boxes, cfg=TINY):
  """Mask [B, F, H, W] with the pixel box (r0, r1, c0, c1) valid in every frame (None: empty)."""
  m = np.zeros((batch, frames, cfg.image_size, cfg.image_size), np.float32)
  for i, box in enumerate(boxes):
    if box is not None:
      r0, r1, c0, c1 = box
      m[:, i, r0:r1, c0:c1] = 1
  return m


@pytest.fixture(scope='session')
def tiny_variables():
  """Randomly initialised tiny STAB variables with non-trivial zero-initialised parts."""
  model = VisualTokenizer(TINY)
  px = jnp.zeros((1, 4, TINY.image_size, TINY.image_size, 3))
  v = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), px, jnp.ones(px.shape[:-1])))
  # Zero-initialised weights (LSTE up, GSTRA out/proj, balance) would hide bugs: randomise all.
  # One jitted program (op by op, every leaf shape would compile its own random and add).
  @jax.jit
  def randomise(v):
    leaves, tree = jax.tree.flatten(v['params'])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
    stats = jax.tree.map(lambda s: s + 0.1, v['batch_stats'])
    return {'params': jax.tree.unflatten(tree, leaves), 'batch_stats': stats}
  return randomise(v)


@pytest.fixture(scope='session')
def tiny_apply():
  """One jitted inference function for the tiny config (compiled once per input shape)."""
  model = VisualTokenizer(TINY)
  return jax.jit(lambda v, x, m: model.apply(v, x, m, return_hidden=True))


# Scheduling for `pytest -n 2 --dist loadfile`: a file is a unit of work, and the slowest ones
# go first (xdist would order files by their number of tests, which puts the long end-to-end
# files with few tests last, where one of them runs alone while the other worker idles).
# Measured CPU time, heaviest first; files not listed follow in their usual order.
SLOWEST_FILES = ('test_demo.py', 'test_smollm2.py', 'test_topology.py', 'test_preemption.py',
                 'test_loop.py',
                 'test_train_step.py', 'test_teacher_cache.py', 'test_train_sharded.py',
                 'test_serve.py', 'test_export.py', 'test_lora.py', 'test_golden.py',
                 'test_gguf.py', 'test_multihost.py',
                 'test_llama.py',
                 'test_ablations.py', 'test_stab.py', 'test_aot.py', 'test_metrics_writer.py',
                 'test_videoqa.py', 'test_predict_cli.py', 'test_predict.py',
                 'test_sharding.py')


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False      # keep the order below


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: files stay whole



def require_package(module: str, install: str):
  """Imports `module` (a package the tests need beyond requirements.txt); when it is missing,
  skips the test with the command `install` that brings it, except in CI (CI=true), where the
  ImportError stands."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError as e:
    if e.name != module or os.environ.get('CI'):
      raise
    pytest.skip(f'{module} is not installed: {install}')


def process_gone(pid: int) -> bool:
  """True once `pid` no longer runs (absent, or a zombie nobody reaped)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
  except FileNotFoundError:
    return True

# ------------------------------------------------------------------------------------------
# A Cloud Storage server on loopback for the gs:// tests.

# What the clients consult, set while a `gcs_bucket` fixture is up (and so inherited by the
# subprocesses the tests start): gcsfs and google-cloud-storage follow STORAGE_EMULATOR_HOST,
# TensorStore (Orbax's arrays) TENSORSTORE_GCS_HTTP_URL, google-cloud-cpp (ArrayRecord's
# reader) CLOUD_STORAGE_EMULATOR_ENDPOINT. The metadata server is pointed at a closed loopback
# port and gcsfs asks for no credentials (fsspec's FSSPEC_GCS_TOKEN) nor for the bucket's
# layout over gRPC, so no request leaves 127.0.0.1.
def _closed_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs_bucket():
  """A bucket on a `gcp-storage-emulator` server on 127.0.0.1 (in memory, this module's
  only; tests/gcs_emulator.py): yields 'gs://NAME', with the environment pointing every
  storage client at it."""
  import socket
  import subprocess
  import time
  port, closed, name = _closed_port(), _closed_port(), 'panda-test'
  url = f'http://127.0.0.1:{port}'
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
         'GCE_METADATA_ROOT': f'127.0.0.1:{closed}', 'GCE_METADATA_HOST': f'127.0.0.1:{closed}',
         'GCE_METADATA_IP': f'127.0.0.1:{closed}', 'NO_GCE_CHECK': 'True',
         'GOOGLE_CLOUD_PROJECT': 'test', 'FSSPEC_GCS_TOKEN': 'anon',
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  # gcp-storage-emulator, with the generation headers and preconditions TensorStore needs.
  log = tempfile.TemporaryFile('w+')      # its log (a pipe nobody reads could fill and block)
  server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                          'gcs_emulator.py'),
                             f'--port={port}', f'--bucket={name}'],
                            stdout=subprocess.DEVNULL, stderr=log)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        server.kill()
        log.seek(0)
        raise RuntimeError(f'the storage emulator did not start: {log.read()[-3000:]}')
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  # fsspec read its FSSPEC_* variables when it was imported: this process gets the setting
  # directly (the subprocesses through the environment).
  import fsspec.config
  saved_conf = dict(fsspec.config.conf.get('gcs', {}))
  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'
  try:
    yield f'gs://{name}'
  finally:
    fsspec.config.conf['gcs'] = saved_conf
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    try:
      server.wait(timeout=10)
    except subprocess.TimeoutExpired:
      server.kill()
    log.close()
