"""KV-cache generation speed of the Llama decoder, against a weight-streaming bound.

Times `panda_jax.eval.generate.generate` (greedy, no end-of-sequence stop, float32, random
seeded parameters and prompt ids, all prompt slots valid) on the default JAX device at a small
config (default: vocab 32000, hidden 1024, 8 layers, 16/16 heads of 64, MLP 2816; batch 1,
prompt 128, 64 new tokens), with the decoder's two parameter layouts side by side: one module
per layer (`scan_layers=False`, what inference uses) and the scanned training layout. The
first token comes from the prefill and each further token costs one forward, so:

  t_1 = generate(max_new_tokens=1)   = prefill
  t_N = generate(max_new_tokens=N)   = prefill + (N - 1) steps
  decode step = (t_N - t_1) / (N - 1)

Each executable is compiled by a first call; times are medians of --runs calls.
Decode tokens/s = batch / decode step. A decode step must at least stream every weight it
uses from memory once: all parameters except the embedding table, of which it reads only the
batch's rows. bound step = those bytes / measured memory bandwidth, the better of a jitted
`jnp.sum` (read only) and `x * 1.0001` (read + write) over a --bandwidth_mib float32 array.
The "+ cache" bound also counts the KV cache at the final length (2 * L * B * (prompt + new)
* K * D * 4 bytes), which each step's attention reads.

Run from the repo root:
  python benchmarks/generate.py                   # default size
  python benchmarks/generate.py --vocab 256 --hidden 64 --layers 2 --heads 4 --kv_heads 2 \
      --head_dim 16 --mlp 128 --prompt 16 --new 8 --runs 2 --bandwidth_mib 16   # tiny
The last line is `RESULT decode_tokens_per_s=<x> bound_fraction=<y>` for the per-layer layout,
where bound_fraction = bound step (weights only) / measured decode step (1.0 = at the bound).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from panda_jax.eval.generate import Sampling, generate  # noqa: E402
import dataclasses  # noqa: E402

from panda_jax.models.llama import Llama, LlamaConfig, unstack_layers  # noqa: E402
from common import median_ms  # noqa: E402


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def bandwidth(mib: int, runs: int) -> tuple[float, float]:
  """(read-only, read + write) memory bandwidth in bytes/s over a `mib` MiB float32 array."""
  x = jax.random.normal(jax.random.PRNGKey(3), (mib * 2 ** 20 // 4,), jnp.float32)
  n = x.nbytes
  read = n / (median_ms(jax.jit(jnp.sum), x, runs=max(runs, 5)) / 1e3)
  copy = 2 * n / (median_ms(jax.jit(lambda a: a * 1.0001), x, runs=max(runs, 5)) / 1e3)
  return read, copy


def main():
  d = LlamaConfig()
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--vocab', type=int, default=d.vocab_size)
  ap.add_argument('--hidden', type=int, default=1024)
  ap.add_argument('--layers', type=int, default=8)
  ap.add_argument('--heads', type=int, default=16)
  ap.add_argument('--kv_heads', type=int, default=16)
  ap.add_argument('--head_dim', type=int, default=64)
  ap.add_argument('--mlp', type=int, default=2816)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--prompt', type=int, default=128, help='prompt length (all valid)')
  ap.add_argument('--new', type=int, default=64, help='new tokens N (at least 2)')
  ap.add_argument('--runs', type=int, default=5, help='timed calls per measurement (median)')
  ap.add_argument('--bandwidth_mib', type=int, default=512, help='bandwidth array size')
  args = ap.parse_args()
  if args.new < 2:
    ap.error('--new must be at least 2 (the decode step is a difference of two lengths)')

  cfg = LlamaConfig(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                    heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                    mlp=args.mlp, max_positions=max(d.max_positions, args.prompt + args.new))
  cfg.validate()
  b, t, n = args.batch, args.prompt, args.new
  model = Llama(cfg)

  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'{os.cpu_count()} CPU cores')
  print(f'config: vocab={cfg.vocab_size} hidden={cfg.hidden} layers={cfg.layers} '
        f'heads={cfg.heads} kv_heads={cfg.kv_heads} head_dim={cfg.head_dim} mlp={cfg.mlp}; '
        f'batch={b} prompt={t} new={n}, float32, greedy, runs={args.runs}')
  bw_read, bw_copy = bandwidth(args.bandwidth_mib, args.runs)

  ids = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, cfg.vocab_size, jnp.int32)
  valid = jnp.ones((b, t), bool)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((b, t, cfg.hidden)), slots,
                               valid)['params']
  embeds = jax.jit(lambda p, i: model.apply({'params': p}, i, method=Llama.embed))(params, ids)
  rng = jax.random.PRNGKey(2)

  def measure(m, p):
    def run(new):
      s = Sampling(max_new_tokens=new, eos_id=None)
      return median_ms(lambda: generate(m, p, embeds, valid, rng, s), runs=args.runs)
    t_1, t_n = run(1), run(n)
    return t_1, (t_n - t_1) / (n - 1)

  flat_model = Llama(dataclasses.replace(cfg, scan_layers=False))
  layouts = {'per-layer': measure(flat_model, unstack_layers(params, cfg.layers)),
             'scanned': measure(model, params)}
  prefill_ms, step_ms = layouts['per-layer']
  # Better of before and after the model runs (a busy neighbour would otherwise skew it).
  bw = max(bw_read, bw_copy, *bandwidth(args.bandwidth_mib, args.runs))

  param_count = sum(x.size for x in jax.tree.leaves(params))
  param_bytes = tree_bytes(params)
  embed_bytes = tree_bytes(params['embed_tokens'])
  step_weight_bytes = param_bytes - embed_bytes + b * cfg.hidden * 4  # only the batch's rows
  cache_bytes = 2 * cfg.layers * b * (t + n) * cfg.kv_heads * cfg.head_dim * 4
  bound_ms = step_weight_bytes / bw * 1e3
  bound_cache_ms = (step_weight_bytes + cache_bytes) / bw * 1e3
  fraction = bound_ms / step_ms

  print()
  print(f'{"row":<26} {"ms":>10} {"tokens/s":>10} {"MB read":>9}')
  for name, (pre, step) in layouts.items():
    print(f'{"prefill, " + name + " (" + str(t) + ")":<26} {pre:>10.2f} '
          f'{b * t / (pre / 1e3):>10.1f} {"-":>9}')
    print(f'{"decode step, " + name:<26} {step:>10.2f} {b / (step / 1e3):>10.2f} {"-":>9}')
  print(f'{"bound (weights only)":<26} {bound_ms:>10.2f} {b / (bound_ms / 1e3):>10.2f} '
        f'{step_weight_bytes / 1e6:>9.1f}')
  print(f'{"bound (weights + cache)":<26} {bound_cache_ms:>10.2f} '
        f'{b / (bound_cache_ms / 1e3):>10.2f} {(step_weight_bytes + cache_bytes) / 1e6:>9.1f}')
  print()
  scan_step = layouts['scanned'][1]
  print(f'per-layer vs scanned decode step: {scan_step / step_ms:.2f}x faster')
  print(f'parameters: {param_count:,} ({param_bytes / 1e6:.1f} MB; embedding table '
        f'{embed_bytes / 1e6:.1f} MB, of which a step reads {b} row(s)); '
        f'KV cache at length {t + n}: {cache_bytes / 1e6:.1f} MB')
  print(f'memory bandwidth: {bw / 1e9:.2f} GB/s measured (sum {bw_read / 1e9:.2f}, '
        f'copy {bw_copy / 1e9:.2f} GB/s before the model; best of before and after, '
        f'{args.bandwidth_mib} MiB float32)')
  print(f'bound fraction (weights + cache): {bound_cache_ms / step_ms:.3f}')
  print(f'RESULT decode_tokens_per_s={b / (step_ms / 1e3):.2f} bound_fraction={fraction:.3f}')


if __name__ == '__main__':
  main()
