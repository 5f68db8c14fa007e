"""A sweep of 7B train-step layouts by the TPU compiler: mesh (fsdp x tensor), per-device
micro-batch, remat policy and attention chunk, for each training stage, at the stage's paper
batch (issue 14, item 2).

Each row runs `benchmarks/aot_7b.py` as its own subprocess (one at a time: a 7B compile takes
~7.5 minutes of one core and ~5.5 GiB of host memory) with the gradient-accumulation steps
derived so that micro-batch x batch shards x accum = the stage's paper batch (2048, 2048,
1024). As soon as a row finishes, its parsed result is appended to a JSON-lines file (one object
per row: the row, the per-chip GiB of the TPU compiler, the no-overlap bound and the ceiling
of aot_7b.py, the compile's CPU seconds, the host and date, its status); rows already in the
file are skipped, so rerunning the same command resumes the sweep. Each row's full output is kept in
`<results dir>/logs/`. A row the TPU compiler refuses for lack of HBM is recorded as
status 'oom' (it does not fit), with the compiler's figure where it gives one.

  python benchmarks/sweep_tpu.py                       # run (or resume) every row
  python benchmarks/sweep_tpu.py --print               # the table from the file, no compiles
  python benchmarks/sweep_tpu.py --list                # the rows and their commands
  python benchmarks/sweep_tpu.py --only 's2 '          # rows whose key matches a regex
  python benchmarks/sweep_tpu.py --retry-failed        # rerun rows recorded as 'error'

The step times and MFUs are MODELLED, never measured: the no-overlap bound (compute + HBM + ICI
time of what the compiled program does, none of them overlapping; the rows are ranked by it) and
beside it the ceiling (the same terms overlapping perfectly). Records written before the bound
existed (2026-12-01) hold only `roofline`'s hand-counted terms; for them both figures come from
those terms (`bounds`), and a stage and topology whose fitting rows are not all of one kind are
ranked by the hand-counted figures, which every row has. The memory is the TPU compiler's own
buffer assignment (`memory_analysis()`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Outside the repository's tracked files (runs/ is ignored); the whole output of each row goes
# to logs/ beside it.
DEFAULT_RESULTS = os.path.join(ROOT, 'runs', 'sweep', 'results.jsonl')
# A row fits when the TPU compiler's per-chip total leaves 1 GiB of the chip's HBM free: 15 GiB
# on a v5e (16 GiB; the target). HBM per chip as in aot_7b.CHIPS (tests/test_sweep.py
# checks they agree; written out so that --print needs no jax import).
HBM_GIB = {'v4': 32.0, 'v5e': 16.0, 'v5p': 95.0, 'v6e': 32.0}
HEADROOM_GIB = 1.0


def fit_gib(topology: str) -> float:
  """The per-chip GiB a row of `topology` ('v5e:8x8') may use to fit."""
  return HBM_GIB[topology.split(':')[0]] - HEADROOM_GIB

# The stages' paper batches (config.STAGES; spec section 6), written out so that --print and
# --list need no jax import. tests/test_sweep.py checks they match config.STAGES.
PAPER_BATCH = {1: 2048, 2: 2048, 3: 1024}
CHIPS = {'v5e:8x8': 64, 'v5e:4x4': 16, 'v5e:2x2': 4, 'v5p:4x4x4': 64, 'v6e:8x8': 64}

DEFAULT_REMAT = 'full'     # train_config's 7B defaults
DEFAULT_CHUNK = 512


def row(stage, fsdp, tensor, mb, remat=DEFAULT_REMAT, chunk=DEFAULT_CHUNK, topology='v5e:8x8',
        why='', tiny=False):
  return dict(stage=stage, topology=topology, fsdp=fsdp, tensor=tensor, micro_batch=mb,
              remat=remat, attention_chunk=chunk, why=why, tiny=tiny)


# Most informative first: each 7B compile costs ~7.5 min of a full core (an hour or more of wall
# time at nice 19 on a shared 2-core machine). Known before the sweep (docs/benchmarks.md, 2026-11-30):
# stage 2, 32 x 2, micro-batch 1 (accum 64) = 9.512 GiB per chip, ceiling (then "MODELLED MFU")
# 75.3 %.
ROWS = [
    row(2, 32, 2, 2, why='the item\'s question: spend the room on a larger micro-batch (accum 32)'),
    row(2, 64, 1, 1, why='no tensor parallelism: no per-layer all-reduces'),
    row(2, 32, 2, 1, remat='dots_no_batch',
        why='save the weight matmuls\' outputs: no recomputed forward (compute term -25 %)'),
    row(1, 32, 2, 2, why='stage 1 (LLM frozen: no LLM optimizer state), larger micro-batch'),
    row(3, 32, 2, 2, why='stage 3 (batch 1024), larger micro-batch (accum 16)'),
    row(2, 64, 1, 2, why='no tensor parallelism and micro-batch 2 (accum 16)'),
    row(2, 32, 2, 1, chunk=1024, why='larger attention query blocks'),
    row(2, 16, 4, 2, why='more tensor parallelism, micro-batch 2 (accum 64)'),
    row(1, 32, 2, 4, why='stage 1, micro-batch 4 (accum 16)'),
    row(1, 64, 1, 2, why='stage 1 without tensor parallelism'),
    # After the first nine: the stage-2 pick (dots_no_batch at micro-batch 1) for stages 3 and
    # 1, and with the larger attention blocks that saved memory at remat=full.
    row(3, 32, 2, 1, remat='dots_no_batch', why='stage 3 with stage 2\'s top remat policy'),
    row(1, 32, 2, 1, remat='dots_no_batch', why='stage 1 with stage 2\'s top remat policy'),
    row(2, 32, 2, 1, remat='dots_no_batch', chunk=1024,
        why='the stage-2 pick with larger attention query blocks'),
    row(3, 64, 1, 1, why='stage 3 without tensor parallelism'),
    row(2, 32, 2, 1, why='the known baseline (9.512 GiB, docs/benchmarks.md) re-measured on this code'),
    row(3, 32, 2, 1, why='stage 3 at the baseline layout (accum 32)'),
    row(1, 32, 2, 1, why='stage 1 at the baseline layout (accum 64)'),
    row(2, 32, 2, 4, why='micro-batch 4 (accum 16)'),
    # Other 64-chip slices, v5e-64's top layout with the micro-batch their HBM allows (v6e: 32
    # GiB, v5p: 95 GiB per chip; a larger micro-batch shortens the no-overlap step).
    row(2, 32, 2, 2, remat='dots_no_batch', topology='v6e:8x8', why='v6e-64: micro-batch 2'),
    row(2, 32, 2, 8, remat='dots_no_batch', topology='v5p:4x4x4', why='v5p-64: micro-batch 8'),
    row(1, 32, 2, 2, remat='dots_no_batch', topology='v6e:8x8', why='v6e-64, stage 1'),
    row(1, 32, 2, 8, remat='dots_no_batch', topology='v5p:4x4x4', why='v5p-64, stage 1'),
    row(3, 32, 2, 2, remat='dots_no_batch', topology='v6e:8x8', why='v6e-64, stage 3'),
    row(3, 32, 2, 8, remat='dots_no_batch', topology='v5p:4x4x4', why='v5p-64, stage 3'),
    # Around those picks on v6e-64 and v5p-64: the layouts, micro-batches and remat policy that
    # were runners-up on v5e-64, so each topology's named variant is the top row of a sweep.
    row(2, 64, 1, 2, remat='dots_no_batch', topology='v6e:8x8',
        why='v6e-64 without tensor parallelism'),
    row(1, 32, 2, 4, remat='dots_no_batch', topology='v6e:8x8',
        why='v6e-64 stage 1 (no LLM optimizer state): micro-batch 4'),
    row(2, 32, 2, 4, topology='v6e:8x8', why='v6e-64: micro-batch 4 with full remat'),
    row(2, 64, 1, 8, remat='dots_no_batch', topology='v5p:4x4x4',
        why='v5p-64 without tensor parallelism'),
    row(2, 32, 2, 4, remat='dots_no_batch', topology='v5p:4x4x4', why='v5p-64: micro-batch 4'),
    row(2, 32, 2, 16, topology='v5p:4x4x4', why='v5p-64: micro-batch 16 with full remat'),
]

# --tiny: the sweep's machinery end to end on the tiny config for a 2x2 v5e slice (~40 s of
# CPU a row), accumulation fixed at 2.
TINY_ROWS = [row(s, 4, 1, 1, chunk=128, topology='v5e:2x2', why='smoke', tiny=True)
             for s in (1, 2, 3)]


def batch_shards(r) -> int:
  """data x fsdp: the mesh axes the default rules split the batch over (data fills the rest of
  the slice after fsdp x tensor)."""
  chips = CHIPS[r['topology']]
  if chips % (r['fsdp'] * r['tensor']):
    raise ValueError(f'{r}: fsdp x tensor does not divide the {chips} chips')
  return chips // r['tensor']


def accum_steps(r) -> int:
  """Accumulation steps that make the stage's paper batch (2 for a tiny row)."""
  if r.get('tiny'):
    return 2
  per_step = r['micro_batch'] * batch_shards(r)
  batch = PAPER_BATCH[r['stage']]
  if batch % per_step:
    raise ValueError(f'{key(r)}: the paper batch {batch} is not a multiple of micro-batch x '
                     f'batch shards = {per_step}')
  return batch // per_step


def key(r) -> str:
  return (('tiny ' if r.get('tiny') else '') + f's{r["stage"]} {r["topology"]} {r["fsdp"]}x{r["tensor"]} mb{r["micro_batch"]} '
          f'remat={r["remat"]} chunk={r["attention_chunk"]}')


def command(r) -> list[str]:
  chips = CHIPS[r['topology']]
  data = chips // (r['fsdp'] * r['tensor'])
  return [sys.executable, os.path.join(ROOT, 'benchmarks', 'aot_7b.py'),
          f'--stage={r["stage"]}', f'--topology={r["topology"]}', f'--data={data}',
          f'--fsdp={r["fsdp"]}', f'--tensor={r["tensor"]}', f'--batch={r["micro_batch"]}',
          f'--accum={accum_steps(r)}', '--set', f'model.llm.remat={r["remat"]}',
          '--set', f'model.llm.attention_chunk={r["attention_chunk"]}'] + \
      (['--tiny'] if r.get('tiny') else [])


RESULT = re.compile(r'RESULT compiler=(\w+) topology=(\S+) per_device_gib=([0-9.naninf]+) '
                    r'no_overlap_mfu=([0-9.naninf]+) ceiling_mfu=([0-9.naninf]+) '
                    r'step_tflops=(\S+)')
# XLA:TPU's refusal, e.g. "RESOURCE_EXHAUSTED: ... Ran out of memory in memory space hbm. Used
# 17.23G of 15.75G hbm."
OOM = re.compile(r'RESOURCE_EXHAUSTED|Ran out of memory|out of memory', re.I)
USED = re.compile(r'Used ([0-9.]+)([KMGT])? of ([0-9.]+)([KMGT])? hbm', re.I)
UNIT = {None: 1 / 1024 ** 3, 'K': 1 / 1024 ** 2, 'M': 1 / 1024, 'G': 1.0, 'T': 1024.0}


def parse(out: str) -> dict:
  """The DETAIL json and RESULT figures of an aot_7b.py output (empty when absent)."""
  got = {}
  for line in out.splitlines():
    if line.startswith('DETAIL '):
      got['detail'] = json.loads(line[len('DETAIL '):])
    m = RESULT.fullmatch(line.strip())
    if m:
      got.update(compiler=m.group(1), result_topology=m.group(2),
                 per_device_gib=float(m.group(3)), no_overlap_mfu=float(m.group(4)),
                 ceiling_mfu=float(m.group(5)), step_tflops=float(m.group(6)))
  return got


def libtpu_version() -> str:
  try:
    from importlib.metadata import version
    return version('libtpu')
  except Exception:
    return 'none'


def git_commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip()
  except OSError:
    return ''


def run_row(r, log_dir: str, timeout: float, dump_hlo: bool = False) -> dict:
  """Compiles one row in a subprocess; its record (status 'ok', 'oom' or 'error'). dump_hlo:
  keep the compiled program's HLO text beside the row's log."""
  cmd = command(r)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  os.makedirs(log_dir, exist_ok=True)
  log = os.path.join(log_dir, re.sub(r'[^A-Za-z0-9_.=-]+', '_', key(r)) + '.log')
  if dump_hlo:
    cmd += ['--dump-hlo', log[:-len('.log')] + '.hlo']
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.time()
  started = datetime.datetime.now().isoformat(timespec='seconds')
  with open(log, 'w') as f:
    f.write(' '.join(cmd) + '\n\n')
    f.flush()
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=timeout)
      rc = proc.returncode
    except subprocess.TimeoutExpired:
      rc = 'timeout'
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  out = open(log).read()
  got = parse(out)
  rec = dict(key=key(r), **r, accum=accum_steps(r), batch=PAPER_BATCH[r['stage']],
             started=started, wall_s=round(time.time() - t0, 1), cpu_s=round(cpu_s, 1),
             max_rss_gib=round(after.ru_maxrss / 1024 ** 2, 2), returncode=rc,
             libtpu=libtpu_version(), commit=git_commit(), host=socket.gethostname(),
             cpus=os.cpu_count(), log=log, command=' '.join(cmd[1:]))
  if rc == 0 and 'per_device_gib' in got:
    d = got.get('detail', {})
    rec.update(status='ok', compiler=got['compiler'], per_device_gib=got['per_device_gib'],
               no_overlap_mfu=got['no_overlap_mfu'], ceiling_mfu=got['ceiling_mfu'],
               step_tflops=got['step_tflops'], no_overlap_step_s=d.get('no_overlap_step_s'),
               no_overlap_terms=d.get('no_overlap_terms'), ceiling_step_s=d.get('ceiling_step_s'),
               program=d.get('program'), hand_ceiling_mfu=d.get('hand_ceiling_mfu'),
               hand_no_overlap_mfu=d.get('hand_no_overlap_mfu'),
               hand_ceiling_step_s=d.get('hand_ceiling_step_s'),
               hand_no_overlap_step_s=d.get('hand_no_overlap_step_s'),
               compile_s=d.get('compile_s'), memory_gib=d.get('memory_gib'),
               t_compute=d.get('t_compute'), t_hbm=d.get('t_hbm'), t_ici=d.get('t_ici'))
  elif OOM.search(out):
    m = USED.search(out)
    rec.update(status='oom', tail=out[-3000:])
    if m:
      rec.update(used_gib=round(float(m.group(1)) * UNIT[m.group(2)], 3),
                 of_gib=round(float(m.group(3)) * UNIT[m.group(4)], 3))
  else:
    rec.update(status='error', tail=out[-3000:])
  return rec


def load(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  recs = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          recs.append(json.loads(line))
        except json.JSONDecodeError:     # a line cut short by a kill: ignored, the row reruns
          pass
  return recs


def latest(recs: list[dict]) -> dict[str, dict]:
  """key -> the last record of that row."""
  return {r['key']: r for r in recs}


def fits(rec) -> bool:
  return rec.get('status') == 'ok' and rec['per_device_gib'] <= fit_gib(rec['topology'])


def bounds(rec, source: str | None = None) -> dict:
  """A record's figures: {'source': 'program' | 'hand', 'no_overlap_mfu', 'no_overlap_step_s',
  'ceiling_mfu', 'ceiling_step_s'}. 'program' = the compiled program's counts (aot_7b.py since
  the no-overlap bound); 'hand' = `roofline`'s hand-counted terms, the only ones in records
  written before it (then named modelled_mfu = the ceiling, modelled_mfu_no_overlap = the
  no-overlap sum). source: ask for one kind (None = the program's where the record has it)."""
  has_program = rec.get('no_overlap_mfu') is not None
  if source == 'program' or (source is None and has_program):
    if not has_program:
      raise ValueError(f'{rec.get("key")}: no compiled-program figures (recorded '
                       f'{rec.get("started", "?")[:10]}); only the hand-counted ones')
    return dict(source='program', no_overlap_mfu=rec['no_overlap_mfu'],
                no_overlap_step_s=rec.get('no_overlap_step_s'),
                ceiling_mfu=rec['ceiling_mfu'], ceiling_step_s=rec.get('ceiling_step_s'))
  old = 'hand_ceiling_mfu' not in rec
  get = lambda new, before: rec.get(before if old else new)
  return dict(source='hand', no_overlap_mfu=get('hand_no_overlap_mfu', 'modelled_mfu_no_overlap'),
              no_overlap_step_s=get('hand_no_overlap_step_s', 'modelled_step_s_no_overlap'),
              ceiling_mfu=get('hand_ceiling_mfu', 'modelled_mfu'),
              ceiling_step_s=get('hand_ceiling_step_s', 'modelled_step_s'))


def ranked(done: dict[str, dict]) -> dict[tuple, list[dict]]:
  """(stage, topology) -> its fitting rows, highest no-overlap-bound MFU first (ties: the higher
  ceiling, then less memory). A group is ranked on the compiled program's bound when every
  fitting row has it, else on the hand-counted one (`bounds`), never on a mix."""
  groups = {}
  for rec in done.values():
    if fits(rec):
      groups.setdefault((rec['stage'], rec['topology']), []).append(rec)
  out = {}
  for k, recs in groups.items():
    source = 'program' if all(r.get('no_overlap_mfu') is not None for r in recs) else 'hand'

    def score(r):
      b = bounds(r, source)
      return (-(b['no_overlap_mfu'] or 0.0), -(b['ceiling_mfu'] or 0.0), r['per_device_gib'])
    out[k] = sorted(recs, key=score)
  return out


def best(done: dict[str, dict]) -> dict[tuple, dict]:
  """(stage, topology) -> its top fitting row by the no-overlap bound (`ranked`)."""
  return {k: v[0] for k, v in ranked(done).items()}


def table(rows: list[dict], done: dict[str, dict]) -> str:
  """A markdown table of every row (the sweep's, then any others in the file), pending where
  not measured yet; 'rank' is the row's place among its stage and topology's fitting rows by
  the no-overlap bound, from the figures ('program' or 'hand') its group is ranked on."""
  order = {id(r): (n + 1, bounds(r, 'program' if all(x.get('no_overlap_mfu') is not None
                                                      for x in rs) else 'hand'))
           for rs in ranked(done).values() for n, r in enumerate(rs)}
  keys = [key(r) for r in rows]
  extra = [v for k, v in done.items() if k not in keys and bool(v.get('tiny')) == bool(
      rows and rows[0].get('tiny'))]
  lines = ['| stage | topology | fsdp x tensor | micro-batch | accum | remat | attn chunk | '
           'GiB/chip (TPU compiler) | fits (HBM - 1 GiB) | no-overlap bound: MFU, s/step | '
           'ceiling (perfect overlap): MFU, s/step | terms | compile CPU s | rank |',
           '|---:|---|---|---:|---:|---|---:|---:|---|---|---|---|---:|---:|']
  pct = lambda x: '-' if x is None else f'{100 * x:.1f} %'
  sec = lambda x: '-' if x is None else f'{x:.1f}'
  for r in list(rows) + extra:
    rec = done.get(key(r))
    acc = accum_steps(r) if r['topology'] in CHIPS else rec.get('accum', '?')
    head = (f'| {r["stage"]} | {r["topology"]} | {r["fsdp"]} x {r["tensor"]} | '
            f'{r["micro_batch"]} | {acc} | {r["remat"]} | {r["attention_chunk"]} | ')
    if rec is None:
      lines.append(head + 'pending | | | | | | |')
    elif rec['status'] == 'ok':
      rank, b = order.get(id(rec), (None, bounds(rec)))
      terms = b['source']
      if terms == 'hand' and rec.get('no_overlap_mfu') is not None:   # ranked among hand rows
        p = bounds(rec, 'program')
        terms += (f' (program: {pct(p["no_overlap_mfu"])}, {sec(p["no_overlap_step_s"])} / '
                  f'{pct(p["ceiling_mfu"])}, {sec(p["ceiling_step_s"])})')
      lines.append(head + f'{rec["per_device_gib"]:.3f} | {"yes" if fits(rec) else "**no**"} | '
                   f'{pct(b["no_overlap_mfu"])}, {sec(b["no_overlap_step_s"])} | '
                   f'{pct(b["ceiling_mfu"])}, {sec(b["ceiling_step_s"])} | {terms} | '
                   f'{rec["cpu_s"]:.0f} | {"" if rank is None else rank} |')
    elif rec['status'] == 'oom':
      used = (f'> HBM (compiler: used {rec["used_gib"]:.2f} of {rec["of_gib"]:.2f})'
              if 'used_gib' in rec else '> HBM (compiler refused)')
      lines.append(head + f'{used} | **no** | | | | {rec["cpu_s"]:.0f} | |')
    else:
      lines.append(head + f'error (rc {rec["returncode"]}, see {rec["log"]}) | | | | | '
                   f'{rec["cpu_s"]:.0f} | |')
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--results', default=DEFAULT_RESULTS, help='JSON-lines results file')
  ap.add_argument('--print', action='store_true', help='print the table from the file only')
  ap.add_argument('--list', action='store_true', help='print the rows and their commands only')
  ap.add_argument('--only', default='', help='regex: run only rows whose key matches')
  ap.add_argument('--retry-failed', action='store_true',
                  help="rerun rows recorded with status 'error' (never 'ok' or 'oom')")
  ap.add_argument('--tiny', action='store_true',
                  help='the tiny rows (a smoke test of the sweep on a 2x2 v5e slice)')
  ap.add_argument('--dump-hlo', action='store_true',
                  help="keep each row's compiled HLO text beside its log (tens of MB a row)")
  ap.add_argument('--timeout', type=float, default=6 * 3600,
                  help='seconds per row before it is recorded as an error')
  args = ap.parse_args(argv)
  every = TINY_ROWS if args.tiny else ROWS
  rows = [r for r in every if re.search(args.only, key(r))]
  done = latest(load(args.results))

  if args.list:
    for r in rows:
      state = done.get(key(r), {}).get('status', 'pending')
      print(f'{key(r):<50} accum {accum_steps(r):>3}  [{state}]  {r["why"]}')
      print('    ' + ' '.join(command(r)[1:]))
    return
  if not args.print:
    for i, r in enumerate(rows):
      prev = done.get(key(r))
      if prev and (prev['status'] != 'error' or not args.retry_failed):
        print(f'[{i + 1}/{len(rows)}] {key(r)}: already {prev["status"]}, skipped', flush=True)
        continue
      print(f'[{i + 1}/{len(rows)}] {key(r)} (accum {accum_steps(r)}): compiling ... '
            f'{datetime.datetime.now().isoformat(timespec="seconds")}', flush=True)
      rec = run_row(r, os.path.join(os.path.dirname(os.path.abspath(args.results)), 'logs'),
                    args.timeout, args.dump_hlo)
      os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
      with open(args.results, 'a') as f:
        f.write(json.dumps(rec, sort_keys=True) + '\n')
      done[rec['key']] = rec
      fig = (f'{rec["per_device_gib"]:.3f} GiB, no-overlap bound MFU '
             f'{100 * rec["no_overlap_mfu"]:.1f} %, ceiling {100 * rec["ceiling_mfu"]:.1f} %'
             if rec['status'] == 'ok' else rec['status'])
      print(f'    -> {fig}; {rec["cpu_s"]:.0f} CPU s, {rec["wall_s"]:.0f} s wall', flush=True)
  print()
  print(table(every, done))
  print()
  for (stage, topo), recs in sorted(ranked(done).items()):
    rec = recs[0]
    b = bounds(rec, 'program' if all(r.get('no_overlap_mfu') is not None for r in recs)
               else 'hand')
    print(f'top fitting row by the no-overlap bound, stage {stage} on {topo}: {rec["key"]} '
          f'({rec["per_device_gib"]:.3f} GiB, no-overlap bound MFU '
          f'{100 * b["no_overlap_mfu"]:.1f} %, ceiling {100 * b["ceiling_mfu"]:.1f} %, '
          f'{b["source"]} terms, {rec["started"][:10]})')


if __name__ == '__main__':
  main()
