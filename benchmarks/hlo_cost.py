"""What a compiled XLA program does in one run, per device, read from its HLO text: matmul
FLOPs, HBM bytes and collective (ICI) bytes, each while loop's body counted as often as it runs;
and the no-overlap step-time bound built from them.

XLA's own `compiled.cost_analysis()` counts a while loop's body once, whatever its trip count,
so for a train step (an accumulation scan around the layer scans) it misses nearly everything.
Here every computation gets a multiplier (ENTRY 1; a while body its caller's times the loop's
trip count, read from `known_trip_count` or from its condition, start and step, as `lax.scan`
writes them) and every count is scaled by it.

Counted, per device:
  flops: 2 x output elements x contracted elements of every dot and convolution (inside fusions
    too); elementwise work and custom calls (Pallas kernels) are not counted.
  HBM bytes: operands read and results written by each instruction outside fusions (a fusion is
    one instruction), but only buffers in HBM: the TPU compiler marks those it keeps in on-chip
    VMEM with memory space S(1), and those are left out. A fusion parameter that is only sliced
    counts as the slice; a result a dynamic-update-slice writes in place counts as the update,
    one passed through from a parameter as nothing.
  ICI bytes: what each device sends in each collective over a ring of its group (n devices):
    all-gather (n - 1) x operand, reduce-scatter (n - 1) / n x operand (the TPU compiler writes
    it as an all-reduce inside an `all-reduce-scatter` fusion), all-reduce 2 (n - 1) / n x
    operand, all-to-all (n - 1) / n x operand, collective-permute the operand.

Python and numpy (no jax), so tests and benchmarks/sweep_tpu.py use it without compiling anything.
"""

from __future__ import annotations

import re

import numpy as np

DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
               'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
               'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3b11fnuz': 1, 'token': 0}

# Published per-chip peaks (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the
# per-generation pages v4, v5e, v5p, v6e): bf16 TFLOP/s, HBM GiB, HBM GB/s, and the chip's
# inter-chip interconnect (ICI) bandwidth in Gbit/s, all its links together (v5e: 1,600 Gbit/s
# = 200 GB/s). A ring over one mesh axis uses only some of a chip's links, so the ICI time
# below is optimistic.
CHIPS = {
    'v4': dict(peak_tflops=275.0, hbm_gib=32.0, hbm_gbs=1200.0, ici_gbps=2400.0),
    'v5e': dict(peak_tflops=197.0, hbm_gib=16.0, hbm_gbs=819.0, ici_gbps=1600.0),
    'v5p': dict(peak_tflops=459.0, hbm_gib=95.0, hbm_gbs=2765.0, ici_gbps=4800.0),
    'v6e': dict(peak_tflops=918.0, hbm_gib=32.0, hbm_gbs=1640.0, ici_gbps=3584.0),
}

_HEADER = re.compile(r'^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$')
_INSTR = re.compile(r'^\s*(ROOT )?%([\w.\-]+) = ')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?')
_CALLED = re.compile(r'\b(calls|body|condition|to_apply|true_computation|false_computation)='
                     r'%([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
COLLECTIVES = ('all-gather', 'all-gather-start', 'all-reduce', 'all-reduce-start',
               'reduce-scatter', 'all-to-all', 'collective-permute', 'collective-permute-start')
_FREE = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'while', 'call',
         'conditional', 'after-all', 'partition-id', 'replica-id', 'opt-barrier',
         'add-dependency', 'async-start', 'async-update', 'async-done', 'all-gather-done',
         'all-reduce-done', 'collective-permute-done', 'copy-done', 'send-done', 'recv-done'}
_SLICES = {'dynamic-slice', 'slice', 'gather'}


def _balanced(s: str, i: int) -> int:
  """Index just past the bracket group that opens at s[i]."""
  depth = 0
  for j in range(i, len(s)):
    if s[j] in '([{':
      depth += 1
    elif s[j] in ')]}':
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
  """Bytes of an HLO shape ('bf16[4,128]{1,0}' or a tuple of them); with hbm_only, arrays in
  memory space S(1) (TPU VMEM) count 0."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES or (hbm_only and 'S(1)' in (layout or '')):
      continue
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * DTYPE_BYTES[dtype]
  return total


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def parse(hlo: str) -> tuple[dict, str]:
  """{computation: [instruction dicts]} and the ENTRY computation's name. An instruction:
  name, root, shape (its text), op, args (the text in its brackets), operands (names), attrs
  (the text after the brackets)."""
  comps, entry, cur = {}, None, None
  for line in hlo.splitlines():
    h = _HEADER.match(line)
    if h:
      cur = h.group(2)
      comps[cur] = []
      if h.group(1):
        entry = cur
      continue
    if line.startswith('}'):
      cur = None
      continue
    m = _INSTR.match(line) if cur is not None else None
    if not m:
      continue
    rest = line[m.end():]
    end = _balanced(rest, 0) if rest.startswith('(') else rest.index(' ')
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r'[\w\-]+', rest).group(0)
    close = _balanced(rest, len(op))
    args = rest[len(op) + 1:close - 1]
    comps[cur].append(dict(name=m.group(2), root=bool(m.group(1)), shape=shape, op=op,
                           args=args, operands=re.findall(r'%([\w.\-]+)', args),
                           attrs=rest[close:]))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def trip_count(instr: dict, comps: dict, caller: str | None = None) -> int | None:
  """A while loop's trip count: XLA's `known_trip_count`, else read from its condition
  (`i < N` on tuple element k, with N a constant) and, in `caller`, the constant element k
  starts from, and in its body the constant it is stepped by (the TPU compiler peels
  iterations off some loops, which then start at 1). None when they cannot be read."""
  m = _TRIP.search(instr['attrs'])
  if m:
    return int(m.group(1))
  cond = re.search(r'condition=%([\w.\-]+)', instr['attrs']).group(1)
  body = re.search(r'body=%([\w.\-]+)', instr['attrs']).group(1)
  by_name = {i['name']: i for c in (cond, body, caller) if c for i in comps.get(c, [])}

  def const(name):                       # a scalar integer constant, through copies
    i = by_name.get(name)
    while i is not None and i['op'] in ('copy', 'bitcast', 'convert') and i['operands']:
      i = by_name.get(i['operands'][0])
    if i is not None and i['op'] == 'constant' and re.fullmatch(r'[su](32|64)\[\]\S*',
                                                                 i['shape']):
      return int(i['args'])
    return None

  def element(name):                     # k when `name` is get-tuple-element(param), index=k
    i = by_name.get(name)
    m = i and i['op'] == 'get-tuple-element' and re.search(r'index=(\d+)', i['attrs'])
    return int(m.group(1)) if m else None

  root = next((i for i in comps.get(cond, []) if i['root']), None)
  if root is None or root['op'] != 'compare' or len(root['operands']) != 2:
    return None
  a, b = root['operands']
  direction = re.search(r'direction=(\w+)', root['attrs']).group(1)
  if const(a) is not None and element(b) is not None:
    a, b = b, a
    direction = {'GT': 'LT', 'GE': 'LE', 'LT': 'GT', 'LE': 'GE'}.get(direction, direction)
  k, limit = element(a), const(b)
  if k is None or limit is None or direction not in ('LT', 'LE'):
    return None
  start = 0
  init = by_name.get(instr['operands'][0]) if instr['operands'] else None
  if init is not None and init['op'] == 'tuple' and k < len(init['operands']):
    start = const(init['operands'][k])
    if start is None:
      return None
  step = 1
  broot = next((i for i in comps.get(body, []) if i['root']), None)
  if broot is not None and broot['op'] == 'tuple' and k < len(broot['operands']):
    inc = by_name.get(broot['operands'][k])
    if inc is not None and inc['op'] == 'add':
      step = next((c for c in map(const, inc['operands']) if c), 1)
  span = limit - start + (direction == 'LE')
  return max(0, -(-span // step))


def multipliers(comps: dict, entry: str) -> tuple[dict, set, list]:
  """(computation -> times it runs per program run, the fused computations, [(loop, trip)])."""
  mult, fused, loops = {entry: 1.0}, set(), []
  order, seen = [], set()

  def visit(c):                      # callers before callees (the call graph is a DAG)
    if c in seen:
      return
    seen.add(c)
    for i in comps.get(c, []):
      for _, callee in _CALLED.findall(i['attrs']):
        visit(callee)
      for b in _BRANCHES.findall(i['attrs']):
        for callee in re.findall(r'%([\w.\-]+)', b):
          visit(callee)
    order.append(c)

  visit(entry)
  for c in reversed(order):
    m = mult.get(c, 0.0)
    for i in comps.get(c, []):
      factor = 1.0
      if i['op'] == 'while':
        n = trip_count(i, comps, c)
        loops.append((i['name'], n))
        factor = float(n) if n is not None else 1.0
      for kind, callee in _CALLED.findall(i['attrs']):
        mult[callee] = mult.get(callee, 0.0) + m * factor
        if i['op'] == 'fusion' and kind == 'calls':
          fused.add(callee)
      for b in _BRANCHES.findall(i['attrs']):
        for callee in re.findall(r'%([\w.\-]+)', b):   # every branch as if taken: an upper bound
          mult[callee] = mult.get(callee, 0.0) + m
  # Computations called from a fused one are fused too (nested fusions, their reductions).
  for c in reversed(order):
    if c in fused:
      for i in comps.get(c, []):
        fused.update(callee for _, callee in _CALLED.findall(i['attrs']))
  return mult, fused, loops


def _group_size(attrs: str, n_devices: int) -> int:
  """Devices in a collective's group: replica_groups as {{0,1,..},..}, [groups,size]<=[..] or
  mesh['a'=4,'b'=2] {'a'}; all devices when empty."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([\w]+)'=(\d+)", m.group(1))}
    n = 1
    for a in re.findall(r"'([\w]+)'", m.group(2)):
      n *= sizes[a]
    return n
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', attrs)
  if m:
    return int(m.group(2))
  m = re.search(r'replica_groups=\{\{([^}]*)\}', attrs)
  if m:
    return len(m.group(1).split(','))
  return n_devices


def ici_bytes(op: str, operand_bytes: float, n: int) -> float:
  """Bytes one device sends in a ring collective over a group of n devices."""
  if n <= 1:
    return 0.0
  op = op.removesuffix('-start')
  if op == 'all-gather':
    return (n - 1) * operand_bytes
  if op in ('reduce-scatter', 'all-to-all'):
    return (n - 1) / n * operand_bytes
  if op == 'all-reduce':
    return 2 * (n - 1) / n * operand_bytes
  if op == 'collective-permute':
    return operand_bytes
  raise ValueError(f'not a collective: {op!r}, expected one of {COLLECTIVES}')


def _matmul_flops(i: dict, shapes: dict) -> float:
  out = 1
  for d in _dims(i['shape']):
    out *= d
  if i['op'] == 'dot':
    lhs = _dims(shapes.get(i['operands'][0], ''))
    m = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', i['attrs'])
    k = 1
    for d in (m.group(1).split(',') if m and m.group(1) else []):
      k *= lhs[int(d)]
    return 2.0 * out * k
  # convolution: 2 x batch x output features x input features x, for each spatial dimension,
  # the (output position, kernel tap) pairs that land on an input element (not on padding or a
  # dilation hole): the TPU compiler writes batched matmuls as such windows.
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', i['attrs'])
  lhs, kernel = _dims(shapes.get(i['operands'][0], '')), _dims(shapes.get(i['operands'][1], ''))
  outd = _dims(i['shape'])
  if not labels or not lhs or not kernel:
    return 0.0
  ll, kl, ol = labels.groups()
  flops = 2.0 * outd[ol.index('b')] * outd[ol.index('f')] * kernel[kl.index('i')]
  win = re.search(r'window=\{([^}]*)\}', i['attrs'])
  fields = dict(f.split('=', 1) for f in win.group(1).split()) if win else {}
  spatial = sorted(c for c in ll if c.isdigit())
  for n, d in enumerate(spatial):
    def field(key, default):
      v = fields.get(key)
      return int(v.split('x')[n]) if v else default
    size, stride = field('size', kernel[kl.index(d)]), field('stride', 1)
    lhs_dil, rhs_dil = field('lhs_dilate', 1), field('rhs_dilate', 1)
    pad = int(fields['pad'].split('x')[n].split('_')[0]) if 'pad' in fields else 0
    span = (lhs[ll.index(d)] - 1) * lhs_dil + 1
    pos = (np.arange(outd[ol.index(d)])[:, None] * stride + np.arange(size)[None, :] * rhs_dil
           - pad)
    flops *= int(np.count_nonzero((pos >= 0) & (pos < span) & (pos % lhs_dil == 0)))
  return flops


def program_cost(hlo: str, n_devices: int = 1, loops_once: bool = False) -> dict:
  """Per-device flops, HBM bytes and ICI bytes of one run of the compiled program (see the
  module docstring), with the loops found and how many collectives of each kind ran.
  loops_once: count each loop body once, as XLA's cost_analysis() does (to compare with it)."""
  comps, entry = parse(hlo)
  mult, fused, loops = multipliers(comps, entry)
  if loops_once:
    mult = {c: 1.0 for c, v in mult.items() if v}
  m = re.search(r'num_partitions=(\d+)', hlo.split('\n', 1)[0])
  n_devices = int(m.group(1)) if m else n_devices
  shapes = {i['name']: i['shape'] for c in comps.values() for i in c}
  users = {}
  for c, instrs in comps.items():
    for i in instrs:
      for k, o in enumerate(i['operands']):
        users.setdefault((c, o), []).append((i, k))

  flops = hbm = ici = 0.0
  collectives = {}
  for c, instrs in comps.items():
    mc = mult.get(c, 0.0)
    if not mc:
      continue
    for i in instrs:
      op = i['op']
      if op in ('dot', 'convolution'):
        flops += mc * _matmul_flops(i, shapes)
      if op in COLLECTIVES:
        kind = 'reduce-scatter' if op == 'all-reduce' and c.startswith('all-reduce-scatter') \
            else op
        b = sum(shape_bytes(shapes.get(o, '')) for o in i['operands'])
        ici += mc * ici_bytes(kind, b, _group_size(i['attrs'], n_devices))
        collectives[kind.removesuffix('-start')] = \
            collectives.get(kind.removesuffix('-start'), 0.0) + mc
      if c in fused or op in _FREE:
        continue
      hbm += mc * _instr_hbm_bytes(i, shapes, comps, users)
  once = sum(_matmul_flops(i, shapes) for c, instrs in comps.items() if mult.get(c)
             for i in instrs if i['op'] in ('dot', 'convolution'))
  return dict(flops=flops, flops_once=once, hbm_bytes=hbm, ici_bytes=ici, loops=loops,
              collectives=collectives, n_devices=n_devices)


def _instr_hbm_bytes(i: dict, shapes: dict, comps: dict, users: dict) -> float:
  """HBM bytes one instruction outside fusions reads and writes."""
  out = shape_bytes(i['shape'], hbm_only=True)
  ops = [shape_bytes(shapes.get(o, ''), hbm_only=True) for o in i['operands']]
  if i['op'] in _SLICES:
    return 2 * out if ops and ops[0] else out
  if i['op'] == 'dynamic-update-slice':
    upd = ops[1] if len(ops) > 1 else 0.0
    return 2 * upd
  if i['op'] != 'fusion':
    return out + sum(ops)
  callee = re.search(r'calls=%([\w.\-]+)', i['attrs']).group(1)
  body = comps.get(callee, [])
  by_index = {int(p['args']): p for p in body if p['op'] == 'parameter'}
  total = 0.0
  for k, b in enumerate(ops):
    p = by_index.get(k)
    use = users.get((callee, p['name']), []) if p else []
    if use and all(u['op'] in _SLICES and j == 0 for u, j in use):
      total += min(b, sum(shape_bytes(u['shape']) for u, _ in use))
    elif use and all(u['op'] == 'dynamic-update-slice' and j == 0 for u, j in use):
      pass                                  # written in place: the update is counted
    else:
      total += b
  # Results: each element of the root (a tuple's elements, or the root alone) writes its bytes,
  # except one a dynamic-update-slice writes in place (its update only) and a parameter passed
  # through (aliased: nothing written).
  named = {x['name']: x for x in body}
  root = next((r for r in body if r['root']), None)
  elems = (root['operands'] if root is not None and root['op'] == 'tuple' else
           [root['name']] if root is not None else [])
  arrays = _ARRAY.findall(i['shape'])
  if len(arrays) != len(elems):
    return total + out
  for (dtype, dims, layout), e in zip(arrays, elems):
    x = named.get(e)
    while x is not None and x['op'] == 'bitcast':
      x = named.get(x['operands'][0])
    if 'S(1)' in (layout or '') or (x is not None and x['op'] == 'parameter'):
      continue
    if x is not None and x['op'] == 'dynamic-update-slice':
      total += shape_bytes(shapes.get(x['operands'][1], ''))   # the rest stays in place
    else:
      total += shape_bytes(f'{dtype}[{dims}]')
  return total


def no_overlap_bound(flops: float, hbm_bytes: float, ici_bytes: float, chip: dict,
                     model_flops_per_device: float) -> dict:
  """Step time when compute, HBM traffic and ICI traffic never overlap (their sum), each at the
  chip's published peak, and the MFU it allows: model FLOPs / (step time x peak); beside it the
  ceiling, the same terms overlapping perfectly (their max). Per device."""
  t_compute = flops / (chip['peak_tflops'] * 1e12)
  t_hbm = hbm_bytes / (chip['hbm_gbs'] * 1e9)
  t_ici = ici_bytes / (chip['ici_gbps'] / 8 * 1e9)
  step, ceiling = t_compute + t_hbm + t_ici, max(t_compute, t_hbm, t_ici)
  peak = chip['peak_tflops'] * 1e12
  return dict(t_compute=t_compute, t_hbm=t_hbm, t_ici=t_ici, step_s=step,
              mfu=model_flops_per_device / (step * peak), ceiling_s=ceiling,
              ceiling_mfu=model_flops_per_device / (ceiling * peak))
