"""The package's layers import one way, and importing a module does no work.

Layers, bottom to top: utilities (storage, tree, distributed), models, sharding and the
read-only view of a run's workdir, data and convert, config, teacher, then train and eval side by side (eval never imports train),
and the entry points on top (demo, predict, serve, main, golden), which may import anything. A
module may import its own layer or one below. A tool's command-line `main` (and an
`if __name__ == '__main__':` block) is an entry point: its imports are not checked.
"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = {'storage': 0, 'tree': 0, 'distributed': 0,
        'models': 1, 'sharding': 1, 'workdir': 1,
        'data': 2, 'convert': 2,
        'config': 3,
        'teacher': 4,
        'train': 5, 'eval': 5}
TOP = ('demo', 'predict', 'serve', 'main', 'golden')


def _layer(module: str) -> str:
  """'panda_jax.data.text' -> 'data'; 'panda_jax.storage' -> 'storage'."""
  return module.split('.')[1]


def _modules():
  for base, _, files in os.walk(os.path.join(ROOT, 'panda_jax')):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(base, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        yield (rel[:-len('.__init__')] if rel.endswith('.__init__') else rel), path


def _imports(tree):
  """(line, imported module) of every import outside entry points (`main`, `__main__`)."""
  skip = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name == 'main' or (
        isinstance(node, ast.If) and '__main__' in ast.unparse(node.test)):
      skip.update(id(n) for n in ast.walk(node))
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.Import):
      yield from ((node.lineno, a.name) for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.lineno, node.module
      if node.module == 'panda_jax':
        yield from ((node.lineno, f'panda_jax.{a.name}') for a in node.names)


def violations(modules) -> list[str]:
  out = []
  for name, path in modules:
    src = _layer(name) if '.' in name else name
    with open(path) as f:
      tree = ast.parse(f.read())
    for line, imported in _imports(tree):
      if not imported.startswith('panda_jax.'):
        continue
      dst = _layer(imported)
      if dst == src or src in TOP:
        continue
      if dst in TOP or src not in RANK or dst not in RANK or RANK[dst] >= RANK[src]:
        out.append(f'{os.path.relpath(path, ROOT)}:{line}: {src} imports {imported} ({dst})')
  return out


def test_layers_import_one_way():
  mods = list(_modules())
  assert len(mods) > 40
  unknown = sorted({_layer(m) for m, _ in mods if m != 'panda_jax'} - set(RANK) - set(TOP))
  assert not unknown, f'modules of no layer (add them to RANK or TOP): {unknown}'
  assert violations(mods) == []


def test_a_violation_is_found(tmp_path):
  bad = tmp_path / 'pipeline.py'
  bad.write_text('from panda_jax.train import checkpoint\n\n\ndef main():\n'
                 '  from panda_jax import main as m\n')
  assert violations([('panda_jax.data.pipeline', str(bad))]) == [
      f'{os.path.relpath(str(bad), ROOT)}:1: data imports panda_jax.train (train)']


def test_importing_a_module_defines_no_flags_and_registers_nothing():
  """Every package module imported in a fresh process: none of ours defines an absl flag,
  Orbax's type handlers are untouched and clu's writers are not loaded (the entry points' flags are defined under `__main__`,
  except panda_jax.main, the program itself; libraries such as Grain define their own)."""
  code = '''
import importlib, pkgutil, sys
from absl import flags
import jax, orbax.checkpoint as ocp
import panda_jax
before_flags = set(flags.FLAGS)
before = ocp.type_handlers.get_type_handler(jax.Array)
names = sorted(m.name for m in pkgutil.walk_packages(panda_jax.__path__, 'panda_jax.')
               if m.name != 'panda_jax.main')
for name in names:
  importlib.import_module(name)
new = sorted(f for f in set(flags.FLAGS) - before_flags
             if (flags.FLAGS.find_module_defining_flag(f) or '').startswith('panda_jax'))
assert not new, f'flags defined at import: {new}'
assert ocp.type_handlers.get_type_handler(jax.Array) is before, 'an Orbax handler registered'
# clu's writers are loaded (with a stand-in for their package) by create_writer, not at import.
assert not [m for m in sys.modules if m.startswith('clu.metric_writers')], 'clu writers loaded'
print(len(names))
'''
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=subprocess_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert int(r.stdout.split()[-1]) > 40
