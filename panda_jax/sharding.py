"""Device mesh and the one table that maps logical axis names onto it.

Model code names axes (`'embed'`, `'mlp'`, `'stab_embed'`, ...); only this file and the config
mention the mesh axes `data`, `fsdp` and `tensor`. Parameters are born sharded:
`jax.eval_shape(init)` gives the logically annotated shapes, `logical_shardings` turns them into
`NamedSharding`s, and `init` runs under `jax.jit(..., out_shardings=...)` so no device ever
holds a whole 7B model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axes. Unlisted names are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # LLM-width dims (decoder and projector output): FSDP over the model width.
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),
    ('layers', None),
    ('vocab', 'tensor'),
    # LoRA factors (A: [in..., rank], B: [rank, out...]): the rank goes over `fsdp` when the
    # factor's model-width side does not already (B of q, k, v, gate and up; A of o and down),
    # so no factor or its AdamW state is whole on every fsdp shard. A rank that `fsdp` does
    # not divide stays whole (`logical_shardings`).
    ('lora_rank', 'fsdp'),
    # Visual part (45M parameters): the projector's wide middle is split over `tensor`, its
    # LLM-width side over `fsdp` (above); the STAB itself is small and replicated.
    ('proj_hidden', 'tensor'),
    ('stab_mlp', 'tensor'),
    ('stab_embed', None),
    ('stab_embed_out', None),
    ('stab_heads', None),
    ('stab_head_dim', None),
    ('stab_lste', None),
    ('stab_patch', None),
    # Distillation head.
    ('distill_layers', None),
    ('teacher_embed', None),
    ('teacher_mlp', 'tensor'),
    ('teacher_heads', 'tensor'),
    ('teacher_embed_in', None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves {'data': -1, 'fsdp': 2, 'tensor': 1} (at most one -1 = fill) for the devices."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'unknown mesh axes {sorted(unknown)}; expected {list(MESH_AXES)}')
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(shape) if s == -1]
  if len(fill) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1')
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))}: sizes must be positive or -1')
  known = int(np.prod([s for s in shape if s != -1]))
  if fill:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))} cannot fill {num_devices} '
                       f'devices: {num_devices} is not a multiple of {known}')
    shape[fill[0]] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))} has {int(np.prod(shape))} devices, '
                     f'but {num_devices} are available')
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


# Logical axes whose mesh axes are dropped (the dimension kept whole) where the mesh does not
# divide them, instead of failing: sharding them only saves memory.
OPTIONAL_AXES = ('lora_rank',)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Logically annotated (boxed) abstract variables -> a tree of `NamedSharding`s (unboxed)."""
  def spec(leaf):
    axes = nn.logical_to_mesh_axes(nn.get_partition_spec(leaf), rules)
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
    # The boxed value itself (`unbox()` would apply a sharding constraint under a mesh).
    shape = getattr(leaf.value if isinstance(leaf, nn.Partitioned) else leaf, 'shape', ())
    if any(n in OPTIONAL_AXES for n in names):
      axes = list(axes) + [None] * (len(names) - len(axes))
      for i, (name, mesh_axes) in enumerate(zip(names, axes)):
        if name in OPTIONAL_AXES and mesh_axes is not None:
          parts = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
          if shape[i] % int(np.prod([mesh.shape[a] for a in parts])):
            axes[i] = None
      axes = PartitionSpec(*axes)
    return axes

  specs = jax.tree.map(spec, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=DEFAULT_RULES):
  """Runs `init_fn(*args)` with every variable created directly in its sharded layout.

  Returns (unboxed variables, their shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)

  def unboxed_init(*a):
    return nn.unbox(init_fn(*a))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
  return variables, shardings


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of an input array whose leading dim is the batch."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def batch_axes(rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes the rules split the batch over (`'batch'`'s entry; () when unlisted)."""
  axes = next((a for name, a in rules if name == 'batch'), None)     # the first rule wins
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many pieces the rules cut a batch into on `mesh` (the product of its batch axes)."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(rules)], dtype=np.int64))
