"""Small building blocks shared by the model files.

Every parameter is created with logical axis names (see `panda_jax/sharding.py` for the one
table that maps them onto mesh axes); no mesh axis name appears in model code.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from panda_jax.models.lora import lora_delta

Dtype = Any
Axes = Sequence[str | None]

# PyTorch's default LayerNorm / BatchNorm epsilon; the released model uses the defaults.
TORCH_LN_EPS = 1e-5

default_kernel_init = nn.initializers.lecun_normal()


def partitioned(init, axes: Axes):
  """Wraps an initializer so the created parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
  """GELU with the erf form (PyTorch's nn.GELU() default)."""
  return jax.nn.gelu(x, approximate=False)


class Dense(nn.Module):
  """Linear layer `y = x @ kernel + bias` over the last `len(in_axes)` dims.

  `in_axes` / `out_axes` are logical names for the contracted and produced dims; the kernel
  has shape `in_shape + out_shape` (PyTorch's `[out, in]` weight is transposed by the
  converters). With `lora` (a `lora.LoraConfig`) the layer adds a LoRA branch (`lora_a`,
  `lora_b` beside the kernel), its dropout drawn from `dropout_rng` when one is given.
  """

  features: int | Sequence[int]
  in_axes: Axes
  out_axes: Axes
  use_bias: bool = True
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    out_shape = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    init = nn.initializers.zeros if self.zero_init else default_kernel_init
    # lecun_normal over a multi-dim kernel: fan_in is the product of the input dims.
    kernel = self.param(
        'kernel',
        partitioned(_fan_in_init(init, n_in, len(out_shape)), tuple(self.in_axes) + tuple(self.out_axes)),
        in_shape + out_shape, self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    contract = tuple(range(x.ndim - n_in, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())))
    if self.lora is not None:
      y = y + lora_delta(self, self.lora, x, in_shape, out_shape, self.in_axes, self.out_axes,
                         self.dtype, self.param_dtype, dropout_rng)
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros, self.out_axes), out_shape,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _fan_in_init(init, n_in: int, n_out: int):
  """Makes a 2-D variance-scaling initializer work on `[*in, *out]` kernels."""

  def f(key, shape, dtype=jnp.float32):
    fan_in = 1
    for s in shape[:n_in]:
      fan_in *= s
    fan_out = 1
    for s in shape[n_in:]:
      fan_out *= s
    return init(key, (fan_in, fan_out), dtype).reshape(shape)

  return f


def layer_norm(axis_name: str, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
               eps: float = TORCH_LN_EPS) -> nn.LayerNorm:
  """LayerNorm over the last dim with PyTorch's epsilon and logically named parameters."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=partitioned(nn.initializers.ones, (axis_name,)),
      bias_init=partitioned(nn.initializers.zeros, (axis_name,)))


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last, with PyTorch's semantics.

  Statistics live in the `batch_stats` collection as `mean` / `var`. In training mode the
  input is normalised with the biased variance while the running variance is updated with the
  unbiased one, `running = (1 - momentum) * running + momentum * batch` (PyTorch's BatchNorm3d;
  Flax's own BatchNorm uses the biased variance for both).

  `per_group=True` takes x as [G, ...] and normalises each group with its own statistics,
  updating the running statistics once per group in order, exactly as G sequential PyTorch
  calls would (the released model runs its tower once per video). Under `jax.jit` over a
  sharded batch the reductions are global.
  """

  axis_name: str
  momentum: float = 0.1
  epsilon: float = TORCH_LN_EPS
  per_group: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    c = x.shape[-1]
    axes = (self.axis_name,)
    ra_mean = self.variable('batch_stats', 'mean', partitioned(nn.initializers.zeros, axes),
                            None, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', partitioned(nn.initializers.ones, axes),
                           None, (c,), jnp.float32)
    scale = self.param('scale', partitioned(nn.initializers.ones, axes), (c,), self.param_dtype)
    bias = self.param('bias', partitioned(nn.initializers.zeros, axes), (c,), self.param_dtype)
    xf = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      first = 1 if self.per_group else 0
      red = tuple(range(first, x.ndim - 1))
      keep = self.per_group
      mean = jnp.mean(xf, axis=red, keepdims=keep)
      var = jnp.mean(jnp.square(xf - mean), axis=red, keepdims=keep)
      if not self.is_initializing():
        m = self.momentum
        bm = mean.reshape(-1, c)                      # [G, C] (G = 1 without groups)
        bv = var.reshape(-1, c)
        n = (xf.size // c) // bm.shape[0]
        bv = bv * (n / max(n - 1, 1))
        g = bm.shape[0]
        # G sequential updates r <- (1 - m) r + m s_i, in closed form.
        w = m * (1 - m) ** jnp.arange(g - 1, -1, -1, dtype=jnp.float32)
        ra_mean.value = (1 - m) ** g * ra_mean.value + jnp.einsum('g,gc->c', w, bm)
        ra_var.value = (1 - m) ** g * ra_var.value + jnp.einsum('g,gc->c', w, bv)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    add = bias.astype(jnp.float32) - mean * mul
    return (xf * mul + add).astype(self.dtype)
