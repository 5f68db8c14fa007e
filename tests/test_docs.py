"""Every documented command is checked: the ```bash / ```sh blocks of README.md and docs/*.md
are parsed, and each `python -m panda_jax...` must name flags its module defines (and, with
`--config=configs/X.py[:variant]`, a config file, variant and override fields that load),
each `python benchmarks/X.py` flags its `--help` lists, each launcher line must pass its
--dry-run (its printed commands checked the same way), each repository path a doc names
(`configs/...`, `launch/...`, `benchmarks/...`, `panda_jax/...`, `docs/...`, `tests/...`) must
exist, each config field named in inline code (`data.system_prompt`) must be one, and each
relative Markdown link must resolve (file and heading)."""

import concurrent.futures
import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys


from conftest import subprocess_env
from test_launch import SHELL_OPERATORS, check_command, module_flags, python_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIRS = ('configs', 'launch', 'benchmarks', 'panda_jax', 'docs', 'tests')
# Top-level config sections whose dotted fields inline code may name (`train.teacher`).
CONFIG_SECTIONS = ('data', 'model', 'train', 'optim', 'init', 'mesh', 'eval', 'checkpoint')
CONFIG_FILES = ('configs/stage1.py:tiny', 'configs/stage2.py:tiny', 'configs/stage3.py:tiny',
                'configs/stab.py:tiny', 'configs/demo.py')


def doc_paths() -> list[str]:
  return ['README.md'] + sorted(os.path.relpath(p, ROOT)
                                for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def shell_commands(text: str) -> list[tuple[int, str]]:
  """(line number, command) for each command line of the doc's ```bash / ```sh blocks:
  backslash continuations joined, comment lines dropped, `$NAME` / `${NAME}` of a plain
  `NAME=value` line earlier in the doc substituted."""
  found, variables = [], {}
  for m in re.finditer(r'^( *)```(?:bash|sh|shell)\n(.*?)^ *```', text, re.S | re.M):
    first = text[:m.start(2)].count('\n') + 1
    joined, start = '', None
    for i, line in enumerate(m.group(2).splitlines()):
      line = line.removeprefix(m.group(1))
      if start is None:
        start = first + i
      if line.rstrip().endswith('\\'):
        joined += line.rstrip()[:-1] + ' '
        continue
      joined += line
      command, joined, at = ' '.join(joined.split()), '', start
      start = None
      if not command or command.startswith('#'):
        continue
      for name, value in variables.items():
        command = re.sub(rf'\$(?:{name}\b|\{{{name}\}})', lambda _: value, command)
      assign = re.fullmatch(r'([A-Za-z_]\w*)=(.*)', command)
      if assign and '$(' not in assign.group(2):
        try:
          [variables[assign.group(1)]] = shlex.split(assign.group(2)) or ['']
        except ValueError:
          pass
        continue
      found.append((at, command))
  return found


def _words(command: str) -> list[str]:
  lex = shlex.shlex(command, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  return list(lex)


def _clean(args: list[str]) -> list[str]:
  """A documented command's arguments as flags: `[--frames=8]` (optional) unbracketed,
  placeholders (`...`) and positional arguments (`[DIR]`) dropped."""
  out = []
  for a in args:
    a = a.strip('[]')
    if a.startswith('--'):
      out.append(a)
  return out


_SCRIPT_FLAGS: dict[str, frozenset] = {}
# Runs each argparse script given as `python SCRIPT --help` in one process, so the imports they
# share (jax) load once; each help text ends with a separator line.
_HELP_DRIVER = """
import contextlib, io, os, runpy, sys
for script in sys.argv[1:]:
  sys.argv = [script, '--help']
  sys.path[0] = os.path.dirname(os.path.abspath(script))   # as `python SCRIPT` sets it
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      runpy.run_path(script, run_name='__main__')
  except SystemExit as e:
    code = e.code
  else:
    code = 'no exit'
  print(out.getvalue())
  print(f'@@@ {script} {code}')
"""


def script_flags(*scripts: str) -> frozenset:
  """The flags `python SCRIPT --help` lists for the (first) script; the help of all `scripts`
  is read in one subprocess and kept."""
  todo = [s for s in scripts if s not in _SCRIPT_FLAGS]
  if todo:
    r = subprocess.run([sys.executable, '-c', _HELP_DRIVER, *todo], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=subprocess_env())
    chunks = re.split(r'^@@@ (\S+) (.*)$', r.stdout, flags=re.M)
    for text, script, code in zip(chunks[0::3], chunks[1::3], chunks[2::3]):
      names = frozenset(re.findall(r'(?<![\w-])--([A-Za-z][\w-]*)', text))
      assert code == '0' and names, (script, code, text[-2000:], r.stderr[-2000:])
      _SCRIPT_FLAGS[script] = names
    assert all(s in _SCRIPT_FLAGS for s in todo), (todo, r.stdout[-2000:], r.stderr[-2000:])
  return _SCRIPT_FLAGS[scripts[0]]


@functools.cache
def config_fields() -> frozenset:
  """Every dotted field of the project's config files (their small variants)."""
  fields = set()

  def walk(d, prefix):
    for k in d.keys():
      fields.add(prefix + k)
      v = d[k]
      if hasattr(v, 'keys') and callable(v.keys):
        walk(v, prefix + k + '.')

  for spec in CONFIG_FILES:
    path, _, arg = spec.partition(':')
    mod_spec = importlib.util.spec_from_file_location(f'_docs_{os.path.basename(path)}',
                                                      os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    walk(mod.get_config(arg) if arg else mod.get_config(), '')
  return frozenset(fields)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@functools.cache
def flags_of(module: str) -> frozenset:
  """module_flags, or none for a module that is no absl program (`panda_jax.golden [DIR]`)."""
  assert importlib.util.find_spec(module), f'no module {module}'
  try:
    return module_flags(module)
  except AssertionError:
    return frozenset()


def _check_panda(module: str, args: list[str]):
  args = _clean(args)
  if any(a.startswith('--config=') and '.py' in a for a in args):
    check_command(module, args)
  else:
    defined = flags_of(module)
    for a in args:
      name = a[2:].partition('=')[0]
      assert name in defined or (name.startswith('no') and name[2:] in defined), (
          f'{module} has no flag --{name}')


def check_line(command: str):
  """Fails unless `command`'s panda_jax, benchmarks and launcher parts exist and parse."""
  words = _words(command)
  for module, args in python_commands(command):
    if module.startswith('panda_jax.'):
      _check_panda(module, args)
  for i, w in enumerate(words):
    if (w in ('python', 'python3') or w.endswith('/python')) and \
        words[i + 1:i + 2] and words[i + 1].startswith('benchmarks/'):
      script = words[i + 1]
      assert os.path.isfile(os.path.join(ROOT, script)), f'no such script {script}'
      defined = script_flags(script)
      for a in _clean(_until_operator(words[i + 2:])):
        name = a[2:].partition('=')[0]
        assert name in defined, f'{script} has no flag --{name}'
    script = w
    if re.fullmatch(r'(?:\./)?launch/[\w.-]+', script):
      assert os.path.isfile(os.path.join(ROOT, script)), f'no such launcher {script}'
      _check_launcher(script.removeprefix('./'), words[:i], _until_operator(words[i + 1:]))


def _until_operator(words):
  out = []
  for a in words:
    if a in SHELL_OPERATORS or set(a) <= set(';&|<>()'):
      break
    out.append(a)
  return out


def _check_launcher(script: str, before: list[str], args: list[str]):
  env = dict(os.environ, TMPDIR='/tmp', SLURM_SUBMIT_DIR=ROOT)
  if script == 'launch/tpu_vm.sh':
    argv = ['bash', script, '--dry-run', *args]
  elif script == 'launch/slurm_gpu.sbatch':
    argv = ['bash', script, *args]
    env['DRY_RUN'] = '1'
  elif script == 'launch/local.sh':
    # No dry run: the processes it starts run `LOCAL_MODULE --multihost ARGS`.
    module = next((w.partition('=')[2] for w in before if w.startswith('LOCAL_MODULE=')),
                  'panda_jax.main')
    assert len(args) >= 2 and args[0].isdigit() and args[1].isdigit(), args
    _check_panda(module, ['--multihost', *args[2:]])
    return
  else:
    raise AssertionError(f'no documented check for {script}')
  r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
  assert r.returncode == 0, (script, args, r.stderr[-2000:])
  for line in r.stdout.splitlines():
    for module, margs in python_commands(line):
      if module.startswith('panda_jax.'):
        _check_panda(module, margs)


FILE_SUFFIXES = {'json', 'jsonl', 'safetensors', 'bin', 'py', 'npz', 'npy', 'md', 'gguf', 'txt'}


def _is_module(name: str) -> bool:
  """Whether `name` or a prefix of it longer than `panda_jax.X` is a module."""
  parts = name.split('.')
  return any(_safe_spec('.'.join(parts[:i])) for i in range(len(parts), 2, -1))


def _safe_spec(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def _paths_in(text: str) -> set[str]:
  """Repository paths a doc names: in inline code, links and shell words."""
  pattern = rf'(?<![\w./-])((?:{"|".join(REPO_DIRS)})/[\w./*-]*[\w/*])'
  return {p.partition(':')[0] for p in re.findall(pattern, text)}


def check_doc(text: str, name: str = 'doc') -> list[str]:
  """Every problem of one doc, as '<name>:<line>: <what>'."""
  problems = []
  for line, command in shell_commands(text):
    try:
      check_line(command)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f'{name}:{line}: {command[:120]!r}: {type(e).__name__}: {e}'[:1500])
  for path in sorted(_paths_in(text)):
    if '*' in path or '<' in path:
      ok = bool(glob.glob(os.path.join(ROOT, path.split('<')[0] + ('*' if '<' in path else ''))))
    else:    # `configs/stageN.py`: a capital letter stands for any name
      ok = os.path.exists(os.path.join(ROOT, path)) or bool(
          glob.glob(os.path.join(ROOT, re.sub(r'(?<=[a-z_])[A-Z](?=[./]|$)', '*', path))))
    if not ok:
      problems.append(f'{name}: names {path}, which does not exist')
  fields = config_fields()
  for field in set(re.findall(rf'`(?:--config\.)?((?:{"|".join(CONFIG_SECTIONS)})\.[a-z_][\w.]*)'
                              r'(?:=[^`]*)?`', text)):
    if field.rpartition('.')[2] in FILE_SUFFIXES or _is_module('panda_jax.' + field):
      continue       # a file name (`model.safetensors`) or a module (`eval.score`)
    if field not in fields:
      problems.append(f'{name}: names config field {field}, which no config file has')
  here = os.path.dirname(os.path.join(ROOT, name))
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+:', target):
      continue
    file, _, anchor = target.partition('#')
    path = os.path.normpath(os.path.join(here, file)) if file else os.path.join(ROOT, name)
    if not os.path.exists(path):
      problems.append(f'{name}: links to {target}, which does not exist')
    elif anchor and path.endswith('.md'):
      with open(path) as f:
        body = re.sub(r'^```.*?^```', '', f.read(), flags=re.S | re.M)
      slugs = {_slug(h) for h in re.findall(r'^#+ (.*)$', body, re.M)}
      if anchor not in slugs:
        problems.append(f'{name}: links to {target}, a heading {os.path.basename(path)} lacks')
  return problems


def _prefetch(texts):
  """Reads the modules' flags (a subprocess each) and the scripts' (one subprocess) in
  parallel, cached."""
  modules, scripts = {'panda_jax.main'}, set()
  for text in texts:
    for _, command in shell_commands(text):
      modules |= {m for m, _ in python_commands(command) if m.startswith('panda_jax.')}
      modules |= {w.partition('=')[2] for w in _words(command) if w.startswith('LOCAL_MODULE=')}
      scripts |= set(re.findall(r'python3? (benchmarks/\w+\.py)', command))
  scripts = {s for s in scripts if os.path.isfile(os.path.join(ROOT, s))}
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    jobs = [pool.submit(script_flags, *sorted(scripts))] if scripts else []
    jobs += [pool.submit(flags_of, m) for m in sorted(modules)]
    for job in jobs:
      job.result()


def test_every_documented_command_flag_config_path_and_link_exists():
  docs = {name: open(os.path.join(ROOT, name)).read() for name in doc_paths()}
  assert len(docs) > 1, 'docs/ holds no pages'
  _prefetch(docs.values())
  problems = [p for name, text in docs.items() for p in check_doc(text, name)]
  assert not problems, '\n'.join(problems)


BAD_DOC = '''# A page

See [training](training.md#no-such-heading) and [gone](missing.md).

```bash
python -m panda_jax.main --config=configs/stage2.py:tiny --config.train.stepz=3
python -m panda_jax.main --config=configs/stage9.py
python -m panda_jax.eval.score --predictions=p.jsonl --no_such_flag=1
python benchmarks/stab.py --runz 3
python benchmarks/nothing.py
launch/tpu_vm.sh panda us-west4-a fly
python -m panda_jax.main --config=configs/stage2.py:tiny \\
  --config.train.steps=3 --workdirr=/tmp/w
```

The field `data.flip_prob` and the file `configs/stage4.py`.
'''


def test_a_bad_doc_fails():
  problems = check_doc(BAD_DOC, 'docs/bad.md')
  text = '\n'.join(problems)
  for expected in ('stepz', 'stage9', 'no_such_flag', 'runz', 'nothing.py', 'tpu_vm.sh',
                   'workdirr', 'data.flip_prob', 'configs/stage4.py', 'missing.md',
                   'no-such-heading'):
    assert expected in text, (expected, text)
  assert len(problems) == 13, text     # stage9 and nothing.py twice: command and path


def test_shell_commands_join_continuations_and_substitute_variables():
  text = ('```bash\nQ=eval/x\nCKPT="--checkpoint=/c --batch_size=2"\n# a comment\n'
          'python -m panda_jax.eval.videoqa $CKPT \\\n  --questions=$Q/q.json\n```\n')
  assert shell_commands(text) == [
      (5, 'python -m panda_jax.eval.videoqa --checkpoint=/c --batch_size=2 '
          '--questions=eval/x/q.json')]
