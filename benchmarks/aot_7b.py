"""Ahead-of-time compile of a training stage's train step at the real 7B size for a TPU pod.

Lowers and compiles `panda_jax.train.step.make_train_step` exactly as `panda_jax.train.loop.train`
jits it (same in/out shardings, donated state, the online LanguageBind teacher where the stage
distils), for the config `train_config(--stage)` (default 2; bf16 compute, float32 master
weights, remat 'full', 4096 tokens, 8 frames x 448 px). Stage 1 trains the STAB, projector and
distillation head with the LLM frozen (no optimizer state or gradients for it); stage 3 trains
everything on its own batch (1024). The global batch is the stage's paper batch unless
`--accum` says otherwise. Every input is abstract (`jax.ShapeDtypeStruct` with its sharding): the
state comes from `jax.eval_shape` of the model init and of the optimizer init, so nothing of
the 7B model is ever allocated.

With `--topology=v5e:8x8` (or v5p:4x4x4, v6e:8x8, ...: what libtpu knows) the devices are those
of that TPU slice from `jax.experimental.topologies.get_topology_desc`, and the program is
compiled by the TPU compiler in libtpu, on this CPU host (no TPU needed; install the libtpu
that `jax[tpu]` pins, see docs/installation.md). Without libtpu, or without `--topology`, it compiles
for N simulated CPU devices (XLA:CPU's estimate) and says `compiler=cpu`.

Reported (per device, from `compiled.memory_analysis()`): argument, output, temp, generated
code and alias sizes and their total (argument + output + temp + code - alias), against the
HBM of the topology's chip (v5e's 16 GiB without one); FLOPs per step from `compiled.cost_analysis()` and from a hand
count (the MFU uses the hand count: XLA counts each while-loop body, i.e. the layer scan and
the accumulation scan, once); the compile time; the number of Pallas TPU kernels in the
compiled program (splash attention).

Two step-time figures, both MODELLED from the compiled program and the chip's published peaks,
never measured on a TPU:
  no-overlap bound: compute + HBM + ICI time, as if none of them overlapped, each from what the
    compiled program does per device (`hlo_cost.program_cost`: its matmul FLOPs, HBM bytes and
    collective bytes, every loop body counted as often as it runs) at the chip's peak FLOP/s,
    HBM and ICI bandwidth; MFU = model FLOPs / (that step time x peak). Layouts are ranked by it.
  ceiling: the step time if compute, HBM and ICI overlapped perfectly, the max of the three terms
    of `roofline` (hand-counted FLOPs incl. remat, stated HBM and ICI bytes); on a compute-bound
    layout it is one minus the remat overhead, an upper bound no layout choice can beat.

Caveats: with compiler=cpu the memory figures are those of the XLA:CPU compiler, whose
scheduling, fusion and bf16 handling differ from XLA:TPU's; they are an estimate of the TPU
footprint. With compiler=tpu they are the TPU compiler's own buffer assignment.

Run from the repo root:
  python benchmarks/aot_7b.py --topology=v5e:8x8       # 7B by the TPU compiler, v5e-64
  python benchmarks/aot_7b.py --topology=v5e:8x8 --stage 1  # stage 1 (LLM frozen)
  python benchmarks/aot_7b.py --tiny --topology=v5e:2x2  # smoke: tiny config, 4 TPU chips
  python benchmarks/aot_7b.py --tiny                   # smoke: tiny config, 8 CPU devices
  python benchmarks/aot_7b.py                          # 7B, 64 CPU devices, fsdp=64
  python benchmarks/aot_7b.py --topology=v5e:8x8 --set model.llm.attention_impl=splash
  python benchmarks/aot_7b.py --fsdp 32 --tensor 2     # another mesh
  python benchmarks/aot_7b.py --layers 2,4             # compile 2 and 4 LLM layers and
                                                       # extrapolate linearly to 32
The last line is `RESULT compiler=<tpu|cpu> topology=<name> per_device_gib=<x>
no_overlap_mfu=<y> ceiling_mfu=<c> step_tflops=<z>`; the line before it, `DETAIL {json}`,
carries the same run's stage, mesh, batch, memory parts, both bounds' terms, the compiled
program's counts and compile times for scripts (`benchmarks/sweep_tpu.py`).
"""

import argparse
import ast
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hlo_cost import CHIPS, no_overlap_bound, program_cost  # noqa: E402  (published chip peaks)

GIB = 1024 ** 3


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--tiny', action='store_true',
                  help="smoke mode: train_config(stage, 'tiny') on 8 devices")
  ap.add_argument('--stage', type=int, default=2, choices=(1, 2, 3),
                  help='training stage whose train step to compile (default 2)')
  ap.add_argument('--lora', action='store_true',
                  help="the stage's `lora` variant (configs/stageN.py:lora): the decoder trained "
                       'through LoRA factors, its base weights frozen in bfloat16')
  ap.add_argument('--topology', type=str, default='',
                  help='TPU slice to compile for with libtpu, e.g. v5e:8x8, v5p:4x4x4 '
                       '(default: simulated CPU devices)')
  ap.add_argument('--devices', type=int, default=None,
                  help='simulated CPU devices (default: the topology\'s chip count, else 64, '
                       '8 with --tiny)')
  ap.add_argument('--data', type=int, default=1, help='mesh axis data (-1 = fill)')
  ap.add_argument('--fsdp', type=int, default=-1, help='mesh axis fsdp (-1 = fill)')
  ap.add_argument('--tensor', type=int, default=1, help='mesh axis tensor (-1 = fill)')
  ap.add_argument('--batch', type=int, default=1,
                  help='per-device micro-batch (sequences per data x fsdp shard per '
                       'accumulation step)')
  ap.add_argument('--accum', type=int, default=None,
                  help='gradient-accumulation steps (default: the stage\'s paper batch / '
                       '(micro-batch x batch shards), e.g. 2048 / (1 x 64) = 32; 2 with '
                       '--tiny)')
  ap.add_argument('--layers', type=str, default='',
                  help='override the LLM layer count; "2,4" compiles both and extrapolates '
                       'the memory linearly to the configured count')
  ap.add_argument('--state-only', action='store_true',
                  help='print the state each device holds (from the shardings) and a STATE json '
                       'line, without lowering or compiling anything')
  ap.add_argument('--dump-hlo', type=str, default='', metavar='PATH',
                  help='write the compiled program\'s HLO text to PATH (the last compile\'s), '
                       'from which hlo_cost.program_cost reads the no-overlap bound\'s counts')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='config override, e.g. model.llm.loss_chunk=512 (repeatable)')
  return ap.parse_args()


def topology_chips(name: str) -> tuple[str, int]:
  """'v5e:8x8' -> ('v5e', 64)."""
  gen, _, dims = name.partition(':')
  try:
    n = int(np.prod([int(d) for d in dims.split('x')]))
  except ValueError:
    n = 0
  if gen not in CHIPS or n <= 0:
    raise SystemExit(f'--topology={name!r}: expected GEN:AxB[xC] with GEN in {sorted(CHIPS)}, '
                     f'e.g. v5e:8x8')
  return gen, n


ARGS = parse_args()
CHIP = topology_chips(ARGS.topology)[0] if ARGS.topology else 'v5e'
N_DEVICES = ARGS.devices or (topology_chips(ARGS.topology)[1] if ARGS.topology else
                             (8 if ARGS.tiny else 64))
# Must precede the first jax import.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={N_DEVICES}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if ARGS.topology:
  # libtpu takes a lock file so that one process owns the TPU; this one only compiles (JAX runs
  # on the CPU), so it may load libtpu beside another process that holds it (a second compile,
  # a test worker, training on this TPU VM).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from panda_jax import config as config_lib  # noqa: E402
from panda_jax import sharding  # noqa: E402
from panda_jax.models.panda import VideoPanda  # noqa: E402
from panda_jax.models.stab import VisualTokenizer  # noqa: E402
from panda_jax.models.teacher import VideoTeacher  # noqa: E402
from panda_jax.train.optimizer import (cast_frozen, frozen_dtype, make_optimizer,  # noqa: E402
                                       param_labels, state_shardings)
from panda_jax.tree import flatten  # noqa: E402
from panda_jax.train.step import TrainState, make_train_step, trainable_tree  # noqa: E402
from common import compiled_flops, compiled_memory, peak_rss_gib, timed  # noqa: E402


def target_devices():
  """(devices, compiler, note): the TPU slice's devices when libtpu knows `--topology`, else
  this host's simulated CPU devices."""
  if not ARGS.topology:
    return jax.devices(), 'cpu', 'no --topology: XLA:CPU on simulated devices'
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform='tpu', topology_name=ARGS.topology)
    return list(topo.devices), 'tpu', f'TPU compiler (libtpu) for {ARGS.topology}'
  except Exception as e:  # no libtpu, or a topology it does not know: say so, fall back
    why = (str(e).strip().splitlines() or [''])[0][:200]
    return jax.devices(), 'cpu', (f'no TPU compiler for {ARGS.topology} ({type(e).__name__}: '
                                  f'{why}); XLA:CPU on {N_DEVICES} simulated devices instead')


DEVICES, COMPILER, COMPILER_NOTE = target_devices()


def parse_override(item: str) -> tuple[str, object]:
  """'model.llm.loss_chunk=512' -> ('model.llm.loss_chunk', 512) (Python literals, else text)."""
  key, sep, text = item.partition('=')
  if not sep or not key:
    raise SystemExit(f'--set {item!r}: expected KEY=VALUE, e.g. model.llm.loss_chunk=512')
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text


def config_arg() -> str:
  """The stage config's argument (`train_config`'s options) this run's flags ask for."""
  return ','.join(o for o, on in (('tiny', ARGS.tiny), ('lora', ARGS.lora)) if on)


def make_config(layers: int | None):
  config = config_lib.train_config(ARGS.stage, config_arg())
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = ARGS.data, ARGS.fsdp, ARGS.tensor
  try:
    config_lib.apply_overrides(config, dict(map(parse_override, ARGS.set)))
  except KeyError as e:
    raise SystemExit(f'--set: {e.args[0]}') from None
  llm = config.model.llm
  if COMPILER != 'tpu' and llm.attention_impl == 'splash' and not llm.attention_interpret:
    raise SystemExit(f'attention_impl=splash is a TPU kernel and needs the TPU compiler: '
                     f'{COMPILER_NOTE}')
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh.to_dict(), len(DEVICES))))
  shards = int(np.prod([shape[a] for a in sharding.batch_axes(config_lib.rules(config))]))
  accum = ARGS.accum or (2 if ARGS.tiny else config.train.batch_size // (ARGS.batch * shards))
  if accum < 1 or (not ARGS.tiny and not ARGS.accum
                   and ARGS.batch * shards * accum != config.train.batch_size):
    raise SystemExit(f'the stage-{ARGS.stage} batch {config.train.batch_size} is not a multiple '
                     f'of --batch {ARGS.batch} x {shards} batch shards; pass --accum')
  config.train.batch_size = ARGS.batch * shards * accum
  config.train.accum_steps = accum
  config.train.steps = 1000   # only shapes the LR schedule
  if layers:
    config.model.llm.layers = layers   # distill.layers follows (config.distill_layers)
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
  # Frozen weights in optim.frozen_dtype (bfloat16 in a LoRA run), as create_state keeps them.
  params = cast_frozen(params, labels, frozen_dtype(config.optim))
  tx, schedules = make_optimizer(labels, config.optim, config.train.steps)
  train, _ = trainable_tree(params, labels)
  train_sh, _ = trainable_tree(params_sh, labels)
  opt_shapes = jax.eval_shape(tx.init, train)
  opt_sh = state_shardings(tx, opt_shapes, train_sh, replicated)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                     params=sds(params, params_sh), batch_stats=sds(batch_stats, stats_sh),
                     opt_state=sds(opt_shapes, opt_sh),
                     rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                     refused=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
  state_sh = TrainState(step=replicated, params=params_sh, batch_stats=stats_sh,
                        opt_state=opt_sh, rng=replicated, refused=replicated)

  # Teacher: as create_teacher, and only where train() makes one (an online teacher).
  if run.online_teacher:
    teacher = VideoTeacher(tc, dtype=run.dtype, param_dtype=run.dtype)
    t_boxed = jax.eval_shape(teacher.init, key, jax.ShapeDtypeStruct((1,) + tp.shape[1:],
                                                                     np.float32))
    t_sh = sharding.logical_shardings(t_boxed, mesh, rules)['params']
    t_params = sds(nn.unbox(t_boxed)['params'], t_sh)
  else:
    teacher, t_sh, t_params = None, {}, {}

  batch_sh = {k: sharding.batch_sharding(mesh, len(s), rules) for k, (s, _) in spec.items()}
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh[k]) for k, (s, d) in spec.items()}

  step = make_train_step(model, labels, tx, schedules, config.train.accum_steps, cfg.distill_weight,
              teacher=teacher)
  n_train = sum(int(np.prod(v.shape)) for k, v in flatten(params).items()
                if labels[k] != 'frozen')
  # The decoder's own weights trained (none with LoRA: only its factors, counted apart).
  is_factor = lambda k: k.endswith(('/lora_a', '/lora_b'))
  n_llm_train = sum(int(np.prod(v.shape)) for k, v in flatten(params).items()
                    if k.startswith('llm/') and labels[k] != 'frozen' and not is_factor(k))
  n_lora = sum(int(np.prod(v.shape)) for k, v in flatten(params).items() if is_factor(k))
  info = dict(cfg=cfg, tc=tc, n_params=count(params), n_train=n_train,
              n_llm_train=n_llm_train, n_lora=n_lora, online_teacher=run.online_teacher,
              n_teacher=count(t_params), n_visual=count(params['visual']),
              n_distill=count(params['distill']),
              state_bytes={'params': shard_bytes(state.params),
                           'optimizer state': shard_bytes(state.opt_state),
                           'batch_stats': shard_bytes(state.batch_stats),
                           'teacher params': shard_bytes(t_params),
                           'batch (whole step)': shard_bytes(batch)},
              rules=rules)
  return step, state, batch, t_params, (state_sh, batch_sh, t_sh), info


def stab_forward_flops(cfg, frames: int) -> float | None:
  """FLOPs of one video's STAB + projector forward, from XLA's cost analysis."""
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


def remat_flops(llm, n_tokens: float, attn: float) -> float:
  """LLM FLOPs the remat policy recomputes in the backward pass (n_tokens = non-embedding
  parameters x tokens; attn = the attention's forward + backward, 3 x its forward):
  'full' (nothing saved) the whole forward, 2 n_tokens + attn / 3; 'dots_no_batch' (the
  weight matmuls' outputs saved) the attention's batched matmuls, attn / 3; 'dots' (every
  matmul saved) nothing, except that query-block attention (`attention_chunk` > 0, or the
  splash kernel) recomputes its blocks' scores anyway, attn / 3; 'none' nothing. Elementwise
  recomputation is not counted. Query-block attention under 'full' is counted once (its block
  recompute inside the recomputed layer is not added)."""
  if llm.remat == 'full':
    return 2 * n_tokens + attn / 3
  if llm.remat == 'dots_no_batch':
    return attn / 3
  if llm.remat == 'dots':
    blocked = llm.attention_impl == 'splash' or llm.attention_chunk > 0
    return attn / 3 if blocked else 0.0
  return 0.0


def hand_flops(config, info) -> dict:
  """Model FLOPs of one optimizer step, counted by hand (forward + backward = 3 x forward).

  LLM: 6 * non-embedding parameters * tokens (4 * when the LLM is frozen, stage 1: forward and
  the input gradients the STAB needs, no weight gradients) + 12 * layers * T^2 * hidden per
  sequence (the causal attention computed in full: forward and its backward, which the input
  gradients need too); teacher: forward only (frozen), its matmuls and both attentions; STAB:
  3 x the XLA count of one video's forward; head: its projections.
  `hardware` adds what the LLM's remat policy recomputes (`remat_flops`).
  """
  cfg, tc = info['cfg'], info['tc']
  b, t, f = config.train.batch_size, config.data.max_len, config.data.frames
  llm = cfg.llm
  n_llm = llm.num_params - llm.vocab_size * llm.hidden           # the lookup costs nothing
  tokens = b * t
  attn = 12 * llm.layers * t * t * llm.hidden * b
  # LoRA factors (the decoder frozen): their forward and both backward matmuls, 6 per factor
  # parameter and token.
  llm_flops = ((6 if info['n_llm_train'] else 4) * n_llm * tokens + attn
               + 6 * info.get('n_lora', 0) * tokens)
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
  remat = remat_flops(llm, n_llm * tokens, attn)
  return {'llm': llm_flops, 'tokens': tokens, 'teacher': teacher, 'stab': stab,
          'stab_video': stab_video, 'distill': distill, 'model': model,
          'hardware': model + remat}


def roofline(config, info, hf, mesh) -> dict:
  """A MODELLED step time from stated terms (seconds per optimizer step, per chip):

  compute: hardware FLOPs (model + remat recompute) / (chips x bf16 peak).
  HBM: per micro-batch, the gathered bf16 LLM weights read once per pass (forward, remat
    recompute, backward: 3 with remat 'full'; 2 with none or a 'dots' policy, whose recompute
    needs no weights) and the f32 gradient accumulator read and written;
    the attention scores of the `xla` attention (f32 scores written and read, bf16
    probabilities written and read: 12 B per score, in the same 3 passes; the splash and cuDNN
    kernels keep them on chip: 0); once per step, Adam (f32 parameter, gradient, two moments:
    read 16 B, write 12 B per parameter) on the chip's shard. Activations, the teacher's and the
    STAB's traffic are not counted (so the HBM term is a lower bound).
  ICI: per micro-batch, FSDP all-gathers of the bf16 LLM weights (forward and backward: 2) and a
    reduce-scatter of the f32 gradients (none for a frozen LLM, stage 1), each moving (f-1)/f of the chip's tensor-parallel
    share; with tensor > 1, the two all-reduces per layer of [tokens, E] bf16 activations in
    each of 3 passes (ring: 2 (t-1)/t of the data); with data > 1, an all-reduce of the f32
    gradient shard per micro-batch. At the chip's whole published ICI bandwidth (optimistic).
  Step time: max of the three (perfect overlap: the ceiling) and their sum (no overlap, from
  these hand-counted terms; the ranked no-overlap bound uses the compiled program's counts).
  """
  chip = CHIPS[CHIP]
  cfg = info['cfg']
  llm = cfg.llm
  d, f, tp = mesh.shape['data'], mesh.shape['fsdp'], mesh.shape['tensor']
  chips = topology_chips(ARGS.topology)[1] if COMPILER == 'tpu' else len(mesh.devices.flat)
  accum = config.train.accum_steps
  b_local = config.train.batch_size // (accum * d * f)      # sequences per chip per micro-batch
  t = config.data.max_len
  n_llm = llm.num_params - llm.vocab_size * llm.hidden
  n_shard = info['n_train'] / (f * tp)
  passes = 3 if llm.remat == 'full' else 2
  hbm_weights = accum * passes * 2 * n_llm / tp
  hbm_accum = accum * 8 * n_shard
  scores = llm.layers * (llm.heads / tp) * b_local * t * t
  hbm_scores = accum * passes * 12 * scores if llm.attention_impl == 'xla' else 0.0
  hbm_adam = 28 * n_shard
  hbm = hbm_weights + hbm_accum + hbm_scores + hbm_adam
  ici_gather = accum * 2 * (f - 1) / f * 2 * llm.num_params / tp
  ici_scatter = accum * (f - 1) / f * 4 * llm.num_params / tp if info['n_llm_train'] else 0.0
  ici_tensor = (accum * passes * 2 * llm.layers * 2 * (tp - 1) / tp * b_local * t * llm.hidden
                * 2)
  ici_data = accum * 2 * (d - 1) / d * 4 * n_shard
  ici = ici_gather + ici_scatter + ici_tensor + ici_data
  t_compute = hf['hardware'] / (chips * chip['peak_tflops'] * 1e12)
  t_hbm = hbm / (chip['hbm_gbs'] * 1e9)
  t_ici = ici / (chip['ici_gbps'] / 8 * 1e9)
  peak_all = chips * chip['peak_tflops'] * 1e12
  t_max, t_sum = max(t_compute, t_hbm, t_ici), t_compute + t_hbm + t_ici
  return dict(chips=chips, b_local=b_local, passes=passes, t_compute=t_compute, t_hbm=t_hbm,
              t_ici=t_ici, hbm=dict(weights=hbm_weights, accumulator=hbm_accum,
                                    scores=hbm_scores, adam=hbm_adam),
              ici=dict(gather=ici_gather, scatter=ici_scatter, tensor=ici_tensor,
                       data=ici_data),
              t_max=t_max, t_sum=t_sum, mfu=hf['model'] / (t_max * peak_all),
              mfu_sum=hf['model'] / (t_sum * peak_all))


def compile_once(layers: int | None) -> dict:
  config = make_config(layers)
  mesh = sharding.make_mesh(config.mesh.to_dict(), DEVICES)

  def lower():
    step, state, batch, tparams, (state_sh, batch_sh, t_sh), info = abstract_inputs(config, mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, t_sh),
                     out_shardings=(state_sh, None), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(info['rules']):   # as train() traces its step
      return jitted.lower(state, batch, tparams), info

  t_lower, (lowered, info) = timed(lower)
  with jax.set_mesh(mesh):
    t_compile, compiled = timed(lowered.compile)
  # Pallas kernels (splash attention) compiled for a TPU appear as Mosaic custom calls.
  hlo = compiled.as_text()
  if ARGS.dump_hlo:
    with open(ARGS.dump_hlo, 'w') as f:
      f.write(hlo)
  kernels = hlo.count('custom_call_target="tpu_custom_call"')
  t_cost, cost = timed(lambda: program_cost(hlo, len(DEVICES)))
  return dict(config=config, mesh=mesh, info=info, mem=compiled_memory(compiled), kernels=kernels,
              xla_flops=compiled_flops(compiled), t_lower=t_lower, t_compile=t_compile,
              layers=config.model.llm.layers, cost=cost, t_cost=t_cost)


def gib(x):
  return '-' if x is None else f'{x / GIB:.3f}'


def main():
  layer_list = [int(x) for x in ARGS.layers.split(',') if x] or [None]
  if len(layer_list) > 2:
    raise SystemExit('--layers takes one or two layer counts')
  full_layers = config_lib.train_config(ARGS.stage, config_arg()).model.llm.layers

  if ARGS.state_only:
    config = make_config(layer_list[0])
    mesh = sharding.make_mesh(config.mesh.to_dict(), DEVICES)
    info = abstract_inputs(config, mesh)[-1]
    print(f'stage {ARGS.stage}: mesh {dict(mesh.shape)}, global batch {config.train.batch_size} '
          f'in {config.train.accum_steps} accumulation steps; LLM '
          f'{"trained" if info["n_llm_train"] else "frozen"}; state held per device:')
    for k, v in info['state_bytes'].items():
      print(f'  {k:<22} {gib(v):>8} GiB')
    print('STATE ' + json.dumps(dict(
        stage=ARGS.stage, batch=config.train.batch_size, accum=config.train.accum_steps,
        n_params=info['n_params'], n_train=info['n_train'], n_llm_train=info['n_llm_train'],
        online_teacher=bool(info['online_teacher']), bytes=info['state_bytes']), sort_keys=True))
    return

  chip = CHIPS[CHIP]
  per_chip = max(1, len(DEVICES) // (topology_chips(ARGS.topology)[1] if COMPILER == 'tpu'
                                      else len(DEVICES)))
  hbm_gib = chip['hbm_gib'] / per_chip          # a v4 chip shows as 2 devices (TensorCores)
  print(f'jax {jax.__version__}; compiler={COMPILER}: {COMPILER_NOTE}; {len(DEVICES)} devices '
        f'({DEVICES[0].device_kind}); {os.cpu_count()} CPU cores')
  results = []
  for layers in layer_list:
    print(f'compiling with {layers or full_layers} LLM layers ...', flush=True)
    results.append(compile_once(layers))
    r = results[-1]
    print(f'  lowered in {r["t_lower"]:.1f} s, compiled in {r["t_compile"]:.1f} s; '
          f'{r["kernels"]} Pallas TPU kernel call(s) (tpu_custom_call) in the compiled '
          f'program', flush=True)

  r = results[-1]
  config, info, mesh = r['config'], r['info'], r['mesh']
  c = config
  print()
  lora = info['cfg'].llm.lora
  lora_note = (f' ({info["n_lora"] / 1e6:.1f} M LoRA parameters trained)' if info['n_lora']
               else '')
  print(f'config: stage {ARGS.stage}{" (tiny)" if ARGS.tiny else ""}'
        f'{f" LoRA rank {lora.rank} on {sorted(lora.targeted())}" if lora.enabled else ""}, '
        f'dtype {c.model.dtype} / params {c.model.param_dtype} (frozen: '
        f'{c.optim.frozen_dtype or c.model.param_dtype}), remat {c.model.llm.remat!r}, max_len {c.data.max_len}, '
        f'{c.data.frames} frames x {info["cfg"].stab.image_size} px, teacher ViT '
        f'{info["tc"].hidden}x{info["tc"].layers} at {info["tc"].image_size} px '
        f'({"online" if info["online_teacher"] else "not in the step"}); LLM '
        f'{"trained" if info["n_llm_train"] else "frozen"}{lora_note}')
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
  print('per-device memory (GiB, compiled.memory_analysis()):')
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
  fits = per_device is not None and per_device / GIB <= hbm_gib
  print(f'  => {gib(per_device)} GiB per device ({"the TPU compiler" if COMPILER == "tpu" else "XLA:CPU estimate"}): '
        f'{"fits" if fits else "does NOT fit"} the {hbm_gib:g} GiB of HBM of a {CHIP} '
        f'{"device" if per_chip > 1 else "chip"}')

  print()
  if extrap is not None or r['layers'] != full_layers:
    print(f'(FLOP figures below are for the {r["layers"]}-layer compile.)')
  hf = hand_flops(config, info)
  xf = r['xla_flops']
  print('FLOPs per optimizer step (whole pod):')
  print(f'  XLA cost_analysis      {"-" if xf is None else f"{xf / 1e12:,.1f}"} TFLOP per device'
        f' program (counts each while-loop body -- the {config.train.accum_steps}-step '
        f'accumulation scan and the layer scan -- once; not used)')
  k = 6 if info['n_llm_train'] else 4
  print(f'  hand: LLM {k}*N*tokens + attention{" + LoRA" if info["n_lora"] else ""}   {hf["llm"] / 1e12:>12,.1f} TFLOP  '
        f'({hf["tokens"]:,} tokens)')
  print(f'  hand: teacher forward              {hf["teacher"] / 1e12:>12,.1f} TFLOP')
  stab_note = ('' if hf['stab_video'] is None else
               f'  (3 x {hf["stab_video"] / 1e9:.1f} GFLOP/video forward, from XLA)')
  print(f'  hand: STAB + projector             {hf["stab"] / 1e12:>12,.1f} TFLOP{stab_note}')
  print(f'  hand: distillation head            {hf["distill"] / 1e12:>12,.1f} TFLOP')
  print(f'  hand: model total (used)           {hf["model"] / 1e12:>12,.1f} TFLOP')
  print(f'  hand: + remat recompute (hardware) {hf["hardware"] / 1e12:>12,.1f} TFLOP')

  rf = roofline(config, info, hf, mesh)
  llm = info['cfg'].llm
  pc = r['cost']
  nb = no_overlap_bound(pc['flops'], pc['hbm_bytes'], pc['ici_bytes'], chip,
                        hf['model'] / rf['chips'])
  print(f'  (XLA cost_analysis, loop bodies once: {(xf or 0) / 1e12:,.2f} TFLOP per device; this '
        f'count with loop bodies once: {pc["flops_once"] / 1e12:,.2f})')
  print()
  print(f'MODELLED step time (not a measurement) on {rf["chips"]} {CHIP} chips: '
        f'{chip["peak_tflops"]:g} TFLOP/s bf16, {chip["hbm_gbs"]:g} GB/s HBM, '
        f'{chip["ici_gbps"]:g} Gbit/s ICI per chip (published; hlo_cost.CHIPS)')
  loops = ', '.join(f'{n if n is not None else "?"}' for _, n in pc['loops'])
  print(f'  the compiled program, per device (hlo_cost.program_cost, {r["t_cost"]:.0f} s; loop '
        f'trip counts {loops or "none"}): {pc["flops"] / 1e12:,.1f} TFLOP of matmuls, '
        f'{pc["hbm_bytes"] / 1e9:,.0f} GB of HBM traffic, {pc["ici_bytes"] / 1e9:,.0f} GB sent '
        f'over ICI ({", ".join(f"{k} x{v:g}" for k, v in sorted(pc["collectives"].items()))})')
  print(f'  NO-OVERLAP BOUND: compute {nb["t_compute"]:.4g} s + HBM {nb["t_hbm"]:.4g} s + ICI '
        f'{nb["t_ici"]:.4g} s = {nb["step_s"]:.4g} s per step -> MFU {100 * nb["mfu"]:.1f}% '
        f'(model {hf["model"] / 1e12:,.1f} TFLOP / ({rf["chips"]} x peak x step))')
  print(f'  CEILING (the same three terms overlapping perfectly: their max; compute-bound when '
        f'the compute term is the largest, i.e. one minus the remat overhead): '
        f'{nb["ceiling_s"]:.4g} s per step -> MFU {100 * nb["ceiling_mfu"]:.1f}%')
  print(f'  cross-check, `roofline` (hand-counted terms; attention '
        f'{llm.attention_impl!r}, {rf["b_local"]} sequence(s) per chip per micro-batch, '
        f'{rf["passes"]} weight passes per micro-batch, remat {llm.remat!r}):')
  print(f'    compute  {hf["hardware"] / 1e12:>12,.1f} TFLOP (hardware) / ({rf["chips"]} x '
        f'{chip["peak_tflops"]:g} TFLOP/s)            = {rf["t_compute"]:.4g} s')
  hb, ic = rf['hbm'], rf['ici']
  print(f'    HBM      weights {hb["weights"] / 1e9:,.0f} GB + grad accumulator '
        f'{hb["accumulator"] / 1e9:,.0f} GB + attention scores {hb["scores"] / 1e9:,.0f} GB + '
        f'Adam {hb["adam"] / 1e9:,.1f} GB per chip / {chip["hbm_gbs"]:g} GB/s = '
        f'{rf["t_hbm"]:.4g} s')
  print(f'    ICI      FSDP all-gathers {ic["gather"] / 1e9:,.0f} GB + gradient reduce-scatters '
        f'{ic["scatter"] / 1e9:,.0f} GB + tensor all-reduces {ic["tensor"] / 1e9:,.0f} GB + '
        f'data all-reduces {ic["data"] / 1e9:,.0f} GB per chip / {chip["ici_gbps"] / 8:g} GB/s '
        f'= {rf["t_ici"]:.4g} s')
  print(f'    max of the terms {rf["t_max"]:.4g} s per step -> MFU {100 * rf["mfu"]:.1f}%; '
        f'their sum {rf["t_sum"]:.4g} s -> {100 * rf["mfu_sum"]:.1f}%')

  print()
  print(f'{"layers":>6} {"mesh d/f/t":>11} {"batch":>6} {"accum":>6} {"GiB/device":>11} '
        f'{"fits":>8} {"lower s":>8} {"compile s":>9} {"TFLOP/step":>11}')
  for x in results:
    m = x['mesh'].shape
    tot = x['mem']['total']
    dft = f'{m["data"]}/{m["fsdp"]}/{m["tensor"]}'
    print(f'{x["layers"]:>6} {dft:>11} '
          f'{x["config"].train.batch_size:>6} {x["config"].train.accum_steps:>6} '
          f'{gib(tot):>11} {"yes" if tot is not None and tot / GIB <= hbm_gib else "no":>8} '
          f'{x["t_lower"]:>8.1f} {x["t_compile"]:>9.1f} {hf["model"] / 1e12:>11,.1f}')
  if extrap is not None:
    print(f'{full_layers:>6} {"(extrapolated)":>11} {"":>6} {"":>6} {gib(per_device):>11} '
          f'{"yes" if fits else "no":>8}')
  print(f'peak host RSS of this process: {peak_rss_gib():.2f} GiB')
  topo = ARGS.topology if COMPILER == 'tpu' else f'cpu:{len(DEVICES)}'
  pd = per_device / GIB if per_device is not None else float('nan')
  m = mesh.shape
  mem = extrap if extrap is not None else r['mem']
  detail = dict(
      stage=ARGS.stage, tiny=ARGS.tiny, lora=ARGS.lora, compiler=COMPILER, topology=topo,
      n_params=info['n_params'], n_train=info['n_train'],
      mesh=dict(data=m['data'], fsdp=m['fsdp'], tensor=m['tensor']), micro_batch=ARGS.batch,
      accum=c.train.accum_steps, batch=c.train.batch_size, remat=llm.remat,
      attention_chunk=llm.attention_chunk, attention_impl=llm.attention_impl,
      overrides=list(ARGS.set), layers=[x['layers'] for x in results],
      extrapolated=extrap is not None, llm_trained=bool(info['n_llm_train']),
      online_teacher=bool(info['online_teacher']), per_device_gib=round(pd, 4),
      hbm_gib=hbm_gib, fits=bool(fits),
      memory_gib={n: (None if mem.get(n) is None else round(mem[n] / GIB, 4)) for n in names},
      model_tflops=hf['model'] / 1e12, hardware_tflops=hf['hardware'] / 1e12,
      no_overlap_step_s=nb['step_s'], no_overlap_mfu=nb['mfu'],
      no_overlap_terms=dict(t_compute=nb['t_compute'], t_hbm=nb['t_hbm'], t_ici=nb['t_ici']),
      program=dict(tflops=pc['flops'] / 1e12, hbm_gb=pc['hbm_bytes'] / 1e9,
                   ici_gb=pc['ici_bytes'] / 1e9, loops=[n for _, n in pc['loops']],
                   collectives=pc['collectives']),
      ceiling_step_s=nb['ceiling_s'], ceiling_mfu=nb['ceiling_mfu'],
      hand_ceiling_step_s=rf['t_max'], hand_ceiling_mfu=rf['mfu'],
      hand_no_overlap_step_s=rf['t_sum'], hand_no_overlap_mfu=rf['mfu_sum'],
      t_compute=rf['t_compute'], t_hbm=rf['t_hbm'], t_ici=rf['t_ici'],
      lower_s=sum(x['t_lower'] for x in results), compile_s=sum(x['t_compile'] for x in results),
      peak_rss_gib=peak_rss_gib(), jax=jax.__version__)
  print('DETAIL ' + json.dumps(detail, sort_keys=True))
  print(f'RESULT compiler={COMPILER} topology={topo} per_device_gib={pd:.3f} '
        f'no_overlap_mfu={nb["mfu"]:.3f} ceiling_mfu={nb["ceiling_mfu"]:.3f} '
        f'step_tflops={_fmt(hf["model"] / 1e12)}')


def _fmt(x: float) -> str:
  return f'{x:.1f}' if abs(x) >= 10 else f'{x:.4g}'


if __name__ == '__main__':
  main()
