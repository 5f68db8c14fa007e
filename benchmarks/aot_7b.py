"""Ahead-of-time compile of the stage-2 train step at the real 7B size on a simulated pod.

Lowers and compiles `panda_jax.train.step.make_train_step` exactly as `panda_jax.train.loop.train`
jits it (same in/out shardings, donated state, online LanguageBind teacher), for the stage-2
config `train_config(2)` (bf16 compute, float32 master weights, remat 'full', 4096 tokens,
8 frames x 448 px), on N simulated CPU devices (default 64: a v5e-64 pod). Every input is
abstract (`jax.ShapeDtypeStruct` with its sharding): the state comes from `jax.eval_shape` of
the model init and of the optimizer init, so nothing of the 7B model is ever allocated.

Reported (per device, from `compiled.memory_analysis()`): argument, output, temp, generated
code and alias sizes and their total (argument + output + temp + code - alias), against the
16 GiB of HBM of a v5e chip; FLOPs per step from `compiled.cost_analysis()` and from a hand
count (the MFU uses the hand count: XLA counts each while-loop body, i.e. the layer scan and
the accumulation scan, once); the MFU implied by an assumed step time and the step time that
gives 40% MFU; the compile time.

Caveats: the memory figures are those of the XLA:CPU compiler, whose scheduling, fusion and
bf16 handling differ from XLA:TPU's; they are an estimate of the TPU footprint, not a
measurement.

Run from the repo root:
  python benchmarks/aot_7b.py --tiny                   # smoke: tiny config, 8 devices
  python benchmarks/aot_7b.py                          # 7B, 64 devices, fsdp=64
  python benchmarks/aot_7b.py --fsdp 32 --tensor 2     # another mesh
  python benchmarks/aot_7b.py --layers 2,4             # compile 2 and 4 LLM layers and
                                                       # extrapolate linearly to 32
The last line is `RESULT per_device_gib=<x> step_tflops=<y>`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 1024 ** 3
V5E_PEAK_TFLOPS = 197.0   # bf16, per chip
V5E_HBM_GIB = 16.0


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--tiny', action='store_true',
                  help="smoke mode: train_config(2, 'tiny') on 8 devices")
  ap.add_argument('--devices', type=int, default=None,
                  help='simulated CPU devices (default 64, 8 with --tiny)')
  ap.add_argument('--data', type=int, default=1, help='mesh axis data (-1 = fill)')
  ap.add_argument('--fsdp', type=int, default=-1, help='mesh axis fsdp (-1 = fill)')
  ap.add_argument('--tensor', type=int, default=1, help='mesh axis tensor (-1 = fill)')
  ap.add_argument('--batch', type=int, default=1,
                  help='per-device micro-batch (sequences per data x fsdp shard per '
                       'accumulation step)')
  ap.add_argument('--accum', type=int, default=None,
                  help='gradient-accumulation steps (default 32: 1 x 64 x 32 = 2048, the '
                       'paper\'s batch; 2 with --tiny)')
  ap.add_argument('--layers', type=str, default='',
                  help='override the LLM layer count; "2,4" compiles both and extrapolates '
                       'the memory linearly to the configured count')
  ap.add_argument('--step_time_s', type=float, default=60.0,
                  help='assumed wall time of one optimizer step for the MFU figure')
  return ap.parse_args()


ARGS = parse_args()
N_DEVICES = ARGS.devices or (8 if ARGS.tiny else 64)
# Must precede the first jax import.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={N_DEVICES}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from panda_jax import config as config_lib  # noqa: E402
from panda_jax import sharding  # noqa: E402
from panda_jax.models.distill import default_layers  # noqa: E402
from panda_jax.models.panda import VideoPanda  # noqa: E402
from panda_jax.models.stab import VisualTokenizer  # noqa: E402
from panda_jax.models.teacher import VideoTeacher  # noqa: E402
from panda_jax.train.optimizer import make_optimizer, param_labels  # noqa: E402
from panda_jax.tree import flatten  # noqa: E402
from panda_jax.train.step import TrainState, make_train_step, trainable_tree  # noqa: E402
from common import compiled_flops, compiled_memory, peak_rss_gib, timed  # noqa: E402


def make_config(layers: int | None):
  config = config_lib.train_config(2, 'tiny' if ARGS.tiny else '')
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = ARGS.data, ARGS.fsdp, ARGS.tensor
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh.to_dict(), N_DEVICES)))
  shards = int(np.prod([shape[a] for a in sharding.batch_axes(config_lib.rules(config))]))
  accum = ARGS.accum or (2 if ARGS.tiny else 32)
  config.train.batch_size = ARGS.batch * shards * accum
  config.train.accum_steps = accum
  config.train.steps = 1000   # only shapes the LR schedule
  if layers:
    config.model.llm.layers = layers
    # Every 4th hidden state, as the release; at least two (the head's query and a key).
    dl = default_layers(layers)
    config.model.distill.layers = list(dl if len(dl) >= 2 else
                                       default_layers(layers, step=max(1, layers // 2)))
  return config


def sds(shapes, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def shard_bytes(tree) -> int:
  """Bytes one device holds of an abstract tree (leaves with shardings)."""
  total = 0
  for a in jax.tree.leaves(tree):
    total += int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
  return total


def count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def abstract_inputs(config, mesh):
  """(step fn, state shapes, batch shapes, teacher shapes, shardings, info) -- all abstract."""
  run = config_lib.resolve(config)
  rules, cfg, tc = run.rules, run.model, run.teacher
  model = VideoPanda(cfg, dtype=run.dtype, param_dtype=run.param_dtype)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  replicated = NamedSharding(mesh, PartitionSpec())

  # Model variables: as create_state, on a batch of one, but only shapes.
  spec = run.batch
  one = {k: jax.ShapeDtypeStruct((1,) + s[1:], d) for k, (s, d) in spec.items()}
  tp = one.pop('teacher_pixels')
  one['teacher'] = jax.ShapeDtypeStruct(tp.shape[:2] + (tc.grid ** 2, tc.hidden), np.float32)
  boxed = jax.eval_shape(model.init, key, one)
  var_sh = sharding.logical_shardings(boxed, mesh, rules)
  variables = nn.unbox(boxed)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  params_sh, stats_sh = var_sh['params'], var_sh.get('batch_stats', {})

  labels = param_labels(flatten(params).keys(), config.optim)
  tx, schedules = make_optimizer(labels, config.optim, config.train.steps)
  train, _ = trainable_tree(params, labels)
  train_sh, _ = trainable_tree(params_sh, labels)
  opt_shapes = jax.eval_shape(tx.init, train)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, train_sh,
                                 transform_non_params=lambda _: replicated)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                     params=sds(params, params_sh), batch_stats=sds(batch_stats, stats_sh),
                     opt_state=sds(opt_shapes, opt_sh),
                     rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                     refused=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
  state_sh = TrainState(step=replicated, params=params_sh, batch_stats=stats_sh,
                        opt_state=opt_sh, rng=replicated, refused=replicated)

  # Teacher: as create_teacher.
  teacher = VideoTeacher(tc, dtype=run.dtype, param_dtype=run.dtype)
  t_boxed = jax.eval_shape(teacher.init, key, jax.ShapeDtypeStruct((1,) + tp.shape[1:],
                                                                   np.float32))
  t_sh = sharding.logical_shardings(t_boxed, mesh, rules)['params']
  t_params = sds(nn.unbox(t_boxed)['params'], t_sh)

  batch_sh = {k: sharding.batch_sharding(mesh, len(s), rules) for k, (s, _) in spec.items()}
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh[k]) for k, (s, d) in spec.items()}

  step = make_train_step(model, labels, tx, schedules, config.train.accum_steps, cfg.distill_weight,
              teacher=teacher)
  n_train = sum(int(np.prod(v.shape)) for k, v in flatten(params).items()
                if labels[k] != 'frozen')
  info = dict(cfg=cfg, tc=tc, n_params=count(params), n_train=n_train,
              n_teacher=count(t_params), n_visual=count(params['visual']),
              n_distill=count(params['distill']),
              state_bytes={'params (f32 master)': shard_bytes(state.params),
                           'optimizer state': shard_bytes(state.opt_state),
                           'batch_stats': shard_bytes(state.batch_stats),
                           'teacher params': shard_bytes(t_params),
                           'batch (whole step)': shard_bytes(batch)},
              rules=rules)
  return step, state, batch, t_params, (state_sh, batch_sh, t_sh), info


def stab_forward_flops(cfg, frames: int) -> float | None:
  """FLOPs of one video's STAB + projector forward, from XLA's cost analysis."""
  from panda_jax.models.stab import VisualTokenizer
  model = VisualTokenizer(cfg.stab)
  s = cfg.stab.image_size
  px = jax.ShapeDtypeStruct((1, frames, s, s, 3), np.float32)
  mk = jax.ShapeDtypeStruct((1, frames, s, s), np.float32)
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), px, mk)
  try:
    c = jax.jit(lambda v, x, m: model.apply(v, x, m)['tokens']).lower(nn.unbox(v), px, mk)
    return compiled_flops(c.compile())
  except Exception:  # the cost is context only
    return None


def hand_flops(config, info) -> dict:
  """Model FLOPs of one optimizer step, counted by hand (forward + backward = 3 x forward).

  LLM: 6 * non-embedding parameters * tokens + 12 * layers * T^2 * hidden per sequence (the
  causal attention computed in full); teacher: forward only (frozen), its matmuls and both
  attentions; STAB: 3 x the XLA count of one video's forward; head: its projections.
  `hardware` adds the recomputed LLM forward of full rematerialisation.
  """
  cfg, tc = info['cfg'], info['tc']
  b, t, f = config.train.batch_size, config.data.max_len, config.data.frames
  llm = cfg.llm
  n_llm = llm.num_params - llm.vocab_size * llm.hidden           # the lookup costs nothing
  tokens = b * t
  attn = 12 * llm.layers * t * t * llm.hidden * b
  llm_flops = 6 * n_llm * tokens + attn
  n_tok = 1 + tc.grid ** 2
  t_layers = tc.run_layers
  teacher = 2 * b * f * n_tok * t_layers * (4 * tc.hidden ** 2 * (2 if tc.temporal else 1)
                                            + 2 * tc.hidden * tc.mlp)
  teacher += 4 * b * f * n_tok * n_tok * tc.hidden * t_layers          # spatial attention
  if tc.temporal:
    teacher += 4 * b * f * n_tok * tc.num_frames * tc.hidden * t_layers  # temporal attention
  stab_video = stab_forward_flops(cfg, f)
  stab = 3 * b * (stab_video or 0.0)
  d = cfg.distill
  patches = b * f * cfg.stab.lsd_grid ** 2
  distill = 3 * 2 * patches * (len(d.layers) * d.llm_hidden * d.teacher_hidden
                               + d.llm_hidden * d.teacher_hidden + d.teacher_hidden ** 2)
  model = llm_flops + teacher + stab + distill
  remat = (2 * n_llm * tokens + attn / 3) if llm.remat != 'none' else 0.0
  return {'llm': llm_flops, 'tokens': tokens, 'teacher': teacher, 'stab': stab,
          'stab_video': stab_video, 'distill': distill, 'model': model,
          'hardware': model + remat}


def compile_once(layers: int | None) -> dict:
  config = make_config(layers)
  mesh = sharding.make_mesh(config.mesh.to_dict())

  def lower():
    step, state, batch, tparams, (state_sh, batch_sh, t_sh), info = abstract_inputs(config, mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, t_sh),
                     out_shardings=(state_sh, None), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(info['rules']):   # as train() traces its step
      return jitted.lower(state, batch, tparams), info

  t_lower, (lowered, info) = timed(lower)
  with jax.set_mesh(mesh):
    t_compile, compiled = timed(lowered.compile)
  return dict(config=config, mesh=mesh, info=info, mem=compiled_memory(compiled),
              xla_flops=compiled_flops(compiled), t_lower=t_lower, t_compile=t_compile,
              layers=config.model.llm.layers)


def gib(x):
  return '-' if x is None else f'{x / GIB:.3f}'


def main():
  layer_list = [int(x) for x in ARGS.layers.split(',') if x] or [None]
  if len(layer_list) > 2:
    raise SystemExit('--layers takes one or two layer counts')
  full_layers = config_lib.train_config(2, 'tiny' if ARGS.tiny else '').model.llm.layers

  print(f'jax {jax.__version__}, backend {jax.default_backend()}, {len(jax.devices())} '
        f'simulated devices, {os.cpu_count()} CPU cores')
  results = []
  for layers in layer_list:
    print(f'compiling with {layers or full_layers} LLM layers ...', flush=True)
    results.append(compile_once(layers))
    r = results[-1]
    print(f'  lowered in {r["t_lower"]:.1f} s, compiled in {r["t_compile"]:.1f} s', flush=True)

  r = results[-1]
  config, info, mesh = r['config'], r['info'], r['mesh']
  c = config
  print()
  print(f'config: stage 2{" (tiny)" if ARGS.tiny else ""}, dtype {c.model.dtype} / params '
        f'{c.model.param_dtype}, remat {c.model.llm.remat!r}, max_len {c.data.max_len}, '
        f'{c.data.frames} frames x {info["cfg"].stab.image_size} px, teacher ViT '
        f'{info["tc"].hidden}x{info["tc"].layers} at {info["tc"].image_size} px (online)')
  print(f'mesh: {dict(mesh.shape)}; global batch {c.train.batch_size} = {ARGS.batch}/device '
        f'micro-batch x {sharding.batch_shards(mesh, info["rules"])} batch shards x '
        f'{c.train.accum_steps} accumulation steps')
  print(f'parameters: {info["n_params"] / 1e9:.3f} B in the model ({info["n_train"] / 1e9:.3f} B '
        f'trainable; visual {info["n_visual"] / 1e6:.1f} M, distill {info["n_distill"] / 1e6:.1f}'
        f' M), teacher {info["n_teacher"] / 1e6:.1f} M (frozen); LLM layers compiled: '
        f'{", ".join(str(x["layers"]) for x in results)}')
  print()
  print('state held per device (from the shardings):')
  for k, v in info['state_bytes'].items():
    print(f'  {k:<22} {gib(v):>8} GiB')

  print()
  names = ['argument', 'output', 'temp', 'generated code', 'alias', 'total']
  head = ''.join(f'{str(x["layers"]) + " layers":>14}' for x in results)
  extrap = None
  if len(results) == 2 and results[0]['layers'] != results[1]['layers']:
    (a, b), la, lb = (results[0]['mem'], results[1]['mem']), results[0]['layers'], \
        results[1]['layers']
    extrap = {}
    for n in names:
      if a.get(n) is not None and b.get(n) is not None:
        per = (b[n] - a[n]) / (lb - la)
        extrap[n] = b[n] + per * (full_layers - lb)
    lin = f'-> {full_layers} (lin.)'
    head += f'{lin:>16}'
  print(f'per-device memory (GiB, compiled.memory_analysis()):')
  print(f'  {"":<16}{head}')
  for n in names:
    row = ''.join(f'{gib(x["mem"].get(n)):>14}' for x in results)
    if extrap is not None:
      row += f'{gib(extrap.get(n)):>16}'
    print(f'  {n:<16}{row}')
  if extrap is not None:
    print(f'  NOTE: the last column is a LINEAR EXTRAPOLATION from the {results[0]["layers"]}- '
          f'and {results[1]["layers"]}-layer compiles to {full_layers} layers, not a compile.')
  per_device = extrap['total'] if extrap is not None else r['mem']['total']
  fits = per_device is not None and per_device / GIB <= V5E_HBM_GIB
  print(f'  => {gib(per_device)} GiB per device: '
        f'{"fits" if fits else "does NOT fit"} the {V5E_HBM_GIB:.0f} GiB of a v5e chip')

  print()
  if extrap is not None or r['layers'] != full_layers:
    print(f'(FLOP figures below are for the {r["layers"]}-layer compile.)')
  hf = hand_flops(config, info)
  xf = r['xla_flops']
  n_dev = len(jax.devices())
  print('FLOPs per optimizer step (whole pod):')
  print(f'  XLA cost_analysis      {"-" if xf is None else f"{xf / 1e12:,.1f}"} TFLOP per device'
        f' program (counts each while-loop body -- the {config.train.accum_steps}-step '
        f'accumulation scan and the layer scan -- once; not used)')
  print(f'  hand: LLM 6*N*tokens + attention   {hf["llm"] / 1e12:>12,.1f} TFLOP  '
        f'({hf["tokens"]:,} tokens)')
  print(f'  hand: teacher forward              {hf["teacher"] / 1e12:>12,.1f} TFLOP')
  stab_note = ('' if hf['stab_video'] is None else
               f'  (3 x {hf["stab_video"] / 1e9:.1f} GFLOP/video forward, from XLA)')
  print(f'  hand: STAB + projector             {hf["stab"] / 1e12:>12,.1f} TFLOP{stab_note}')
  print(f'  hand: distillation head            {hf["distill"] / 1e12:>12,.1f} TFLOP')
  print(f'  hand: model total (used)           {hf["model"] / 1e12:>12,.1f} TFLOP')
  print(f'  hand: + remat recompute (hardware) {hf["hardware"] / 1e12:>12,.1f} TFLOP')
  peak = n_dev * V5E_PEAK_TFLOPS * 1e12
  mfu = hf['model'] / (ARGS.step_time_s * peak)
  t40 = hf['model'] / (0.4 * peak)
  print(f'  MFU at an assumed {ARGS.step_time_s:g} s/step on {n_dev} v5e chips '
        f'({V5E_PEAK_TFLOPS:g} TFLOP/s bf16 each): {100 * mfu:.1f}%; 40% MFU needs '
        f'{t40:.1f} s/step (hardware FLOP utilisation there: '
        f'{100 * 0.4 * hf["hardware"] / hf["model"]:.0f}%)')

  print()
  print(f'{"layers":>6} {"mesh d/f/t":>11} {"batch":>6} {"accum":>6} {"GiB/device":>11} '
        f'{"fits 16G":>8} {"lower s":>8} {"compile s":>9} {"TFLOP/step":>11}')
  for x in results:
    m = x['mesh'].shape
    tot = x['mem']['total']
    dft = f'{m["data"]}/{m["fsdp"]}/{m["tensor"]}'
    print(f'{x["layers"]:>6} {dft:>11} '
          f'{x["config"].train.batch_size:>6} {x["config"].train.accum_steps:>6} '
          f'{gib(tot):>11} {"yes" if tot is not None and tot / GIB <= V5E_HBM_GIB else "no":>8} '
          f'{x["t_lower"]:>8.1f} {x["t_compile"]:>9.1f} {hf["model"] / 1e12:>11,.1f}')
  if extrap is not None:
    print(f'{full_layers:>6} {"(extrapolated)":>11} {"":>6} {"":>6} {gib(per_device):>11} '
          f'{"yes" if fits else "no":>8}')
  print(f'peak host RSS of this process: {peak_rss_gib():.2f} GiB')
  print(f'RESULT per_device_gib={per_device / GIB if per_device is not None else float("nan"):.3f}'
        f' step_tflops={_fmt(hf["model"] / 1e12)}')


def _fmt(x: float) -> str:
  return f'{x:.1f}' if abs(x) >= 10 else f'{x:.4g}'


if __name__ == '__main__':
  main()
