"""The pod-layout variants (`configs/stageN.py:v5e-64`) and the layout sweep's bookkeeping
(benchmarks/sweep_tpu.py), without compiling anything."""

import importlib.util
import json
import os

import pytest

from panda_jax import config as config_lib
from panda_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


sweep = _module('benchmarks/sweep_tpu.py', 'sweep_tpu')


@pytest.mark.parametrize('stage', [1, 2, 3])
def test_pod_variants_resolve_at_the_paper_batch(stage):
  mod = _module(f'configs/stage{stage}.py', f'stage{stage}_config')
  assert 'v5e-64' in mod.LAYOUTS
  for name in mod.LAYOUTS:
    _check_variant(mod, stage, name)


def _check_variant(mod, stage, name):
  layout = mod.LAYOUTS[name]
  config = mod.get_config(name)
  run = config_lib.resolve(config)
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(run.mesh, layout['chips'])))
  shards = shape['data'] * shape['fsdp']
  batch = config_lib.STAGES[stage]['batch_size']
  assert config.stage == stage and config.train.batch_size == batch
  assert (shape['fsdp'], shape['tensor']) == (layout['fsdp'], layout['tensor'])
  assert layout['micro_batch'] * shards * config.train.accum_steps == batch
  assert run.batch['labels'][0] == (batch, config.data.max_len)
  assert config.model.llm.remat == layout['remat']
  assert config.model.llm.attention_chunk == layout['attention_chunk']
  # The 7B model, everything else as the plain stage config.
  plain = mod.get_config('')
  assert config.model.llm.layers == plain.model.llm.layers == 32
  assert config.optim.to_dict() == plain.optim.to_dict()
  # Combines with a teacher; a second layout, an unknown option or the tiny batch are refused.
  assert mod.get_config(f'{name},teacher=clip').model.teacher.temporal is False
  for bad in (f'{name},{name}', 'v5e-128', f'tiny,{name}'):
    with pytest.raises(ValueError):
      mod.get_config(bad)


def test_a_row_fits_by_its_own_chips_hbm():
  chips = _module('benchmarks/hlo_cost.py', 'hlo_cost').CHIPS     # aot_7b.py's chip figures
  assert sweep.HBM_GIB == {k: v['hbm_gib'] for k, v in chips.items()}
  r5e = _record(sweep.row(2, 32, 2, 1), status='ok', per_device_gib=15.0)
  assert sweep.fits(r5e) and not sweep.fits(dict(r5e, per_device_gib=15.01))
  r5p = _record(sweep.row(2, 32, 2, 8, topology='v5p:4x4x4'), status='ok', per_device_gib=60.0)
  assert sweep.fits(r5p) and not sweep.fits(dict(r5p, per_device_gib=94.5))
  assert not sweep.fits(dict(r5e, status='oom'))


def test_sweep_rows_make_each_stages_paper_batch():
  assert sweep.PAPER_BATCH == {s: v['batch_size'] for s, v in config_lib.STAGES.items()}
  keys = [sweep.key(r) for r in sweep.ROWS]
  assert len(set(keys)) == len(keys)
  assert {r['stage'] for r in sweep.ROWS} == {1, 2, 3}
  for r in sweep.ROWS:
    assert r['micro_batch'] * sweep.batch_shards(r) * sweep.accum_steps(r) == \
        sweep.PAPER_BATCH[r['stage']]
    cmd = ' '.join(sweep.command(r))
    assert f'--stage={r["stage"]}' in cmd and f'--accum={sweep.accum_steps(r)}' in cmd


def _record(r, **kw):
  rec = dict(key=sweep.key(r), **r, accum=sweep.accum_steps(r), started='2026-12-01T00:00:00',
             cpu_s=450.0, returncode=0, log='x.log')
  rec.update(kw)
  return rec


def _program(rec_row, no_overlap, ceiling, gib, **kw):
  """An 'ok' record as aot_7b.py writes it since the no-overlap bound."""
  return _record(rec_row, status='ok', per_device_gib=gib, no_overlap_mfu=no_overlap,
                 no_overlap_step_s=30 / no_overlap, ceiling_mfu=ceiling,
                 ceiling_step_s=30 / ceiling, hand_ceiling_mfu=0.5, hand_no_overlap_mfu=0.4,
                 **kw)


def test_rows_are_ranked_by_the_no_overlap_bound_not_the_ceiling():
  v5e = [r for r in sweep.ROWS if r['stage'] == 2 and r['topology'] == 'v5e:8x8']
  hi_ceiling = _program(v5e[0], no_overlap=0.40, ceiling=0.95, gib=12.0)
  hi_bound = _program(v5e[1], no_overlap=0.55, ceiling=0.75, gib=14.0)
  too_big = _program(v5e[2], no_overlap=0.70, ceiling=0.99, gib=15.5)   # over 15 GiB
  done = sweep.latest([hi_ceiling, hi_bound, too_big])
  order = sweep.ranked(done)[(2, 'v5e:8x8')]
  assert [r['key'] for r in order] == [hi_bound['key'], hi_ceiling['key']]
  assert sweep.best(done)[(2, 'v5e:8x8')] is hi_bound
  out = sweep.table(sweep.ROWS, done)
  assert f'| 14.000 | yes | 55.0 %, 54.5 | 75.0 %, 40.0 | program | 450 | 1 |' in out
  assert f'| 12.000 | yes | 40.0 %, 75.0 | 95.0 %, 31.6 | program | 450 | 2 |' in out
  # A record from before the bound (2026-12-01) has only the hand-counted terms; a group with
  # one is ranked on those for every row, never on a mix.
  old = _record(v5e[3], status='ok', per_device_gib=10.0, modelled_mfu=0.75,
                modelled_mfu_no_overlap=0.45, modelled_step_s=41.3,
                modelled_step_s_no_overlap=70.0)
  assert sweep.bounds(old) == dict(source='hand', no_overlap_mfu=0.45, no_overlap_step_s=70.0,
                                   ceiling_mfu=0.75, ceiling_step_s=41.3)
  with pytest.raises(ValueError, match='no compiled-program figures'):
    sweep.bounds(old, 'program')
  got = sweep.parse('DETAIL {"no_overlap_step_s": 57.1}\nRESULT compiler=tpu topology=v5e:8x8 '
                    'per_device_gib=14.591 no_overlap_mfu=0.420 ceiling_mfu=0.956 '
                    'step_tflops=391887.9\n')
  assert (got['no_overlap_mfu'], got['ceiling_mfu'], got['detail']) == \
      (0.42, 0.956, {'no_overlap_step_s': 57.1})
  mixed = sweep.ranked(sweep.latest([hi_ceiling, hi_bound, old]))[(2, 'v5e:8x8')]
  assert mixed[0] is old and {r['key'] for r in mixed[1:]} == {hi_ceiling['key'],
                                                              hi_bound['key']}
  out = sweep.table(sweep.ROWS, sweep.latest([hi_ceiling, hi_bound, old]))
  assert '| 12.000 | yes | 40.0 %, - | 50.0 %, - | hand (program: 40.0 %, 75.0 / 95.0 %, 31.6) |' \
      in out


def test_sweep_resumes_skips_done_rows_and_ranks_the_fitting_rows(tmp_path, monkeypatch,
                                                                 capsys):
  a, b, c = sweep.ROWS[:3]
  path = tmp_path / 'results.jsonl'
  recs = [_program(a, no_overlap=0.5, ceiling=0.8, gib=12.0),
          _program(b, no_overlap=0.6, ceiling=0.9, gib=15.5),                  # does not fit
          _record(c, status='oom', used_gib=17.2, of_gib=15.75)]
  path.write_text(''.join(json.dumps(x) + '\n' for x in recs) + '{"cut sho')
  calls = []
  monkeypatch.setattr(sweep, 'run_row', lambda r, *_: calls.append(r) or _record(
      r, status='error', returncode=1))
  sweep.main(['--results', str(path), '--only', '|'.join(
      __import__('re').escape(sweep.key(x)) for x in (a, b, c))])
  assert calls == []                             # all three recorded: nothing recompiles
  out = capsys.readouterr().out
  best = sweep.best(sweep.latest(sweep.load(str(path))))
  assert best[(a['stage'], a['topology'])]['key'] == sweep.key(a)
  assert '| 12.000 | yes | 50.0 %, 60.0 | 80.0 %, 37.5 | program | 450 | 1 |' in out
  assert '| 15.500 | **no** |' in out
  assert 'used 17.20 of 15.75' in out
  assert out.count('| pending |') == len(sweep.ROWS) - 3
  sweep.main(['--results', str(path), '--print'])
  assert calls == []
