"""The authors' weight initialisation schemes as Flax initializers.

The CGN authors initialise with pix2pix's ``init_net`` (utils/train_utils.py): conv/linear weights by
'normal' (std = gain), 'xavier' (normal, gain), 'kaiming' (normal, fan_in, a=0) or 'orthogonal'
(gain), biases 0, and BatchNorm2d weight N(1, gain) / bias 0. Modules they leave alone (DiscLin, the
CNN classifier) keep torch's defaults, reproduced as 'torch_default'. Flax kernels are HWIO/(in,out);
the fan computations of ``variance_scaling`` agree with torch's for these layouts.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Initializer = Callable[..., jax.Array]
INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal", "torch_default")


def kernel_init(init_type: str, gain: float) -> Initializer:
  """Initializer for conv/linear kernels following ``init_net(init_type, init_gain)``."""
  if init_type == "normal":
    return nn.initializers.normal(gain)
  if init_type == "xavier":
    return nn.initializers.variance_scaling(gain ** 2, "fan_avg", "normal")
  if init_type == "kaiming":
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
  if init_type == "orthogonal":
    # torch orthogonalises the (out, in*k*k) matrix; Flax the (k*k*in, out) one: the same law, transposed.
    return nn.initializers.orthogonal(gain)
  if init_type == "torch_default":
    # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
  raise ValueError(f"unknown init_type '{init_type}'; choose one of {INIT_TYPES}")


def bias_init(init_type: str, fan_in: int) -> Initializer:
  """Zeros under ``init_net``; torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) otherwise."""
  if init_type != "torch_default":
    return nn.initializers.zeros
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def bn_scale_init(init_type: str, gain: float) -> Initializer:
  """BatchNorm2d weight: N(1, gain) under ``init_net``; ones by torch default."""
  if init_type == "torch_default":
    return nn.initializers.ones
  return lambda key, shape, dtype=jnp.float32: 1.0 + gain * jax.random.normal(key, shape, dtype)


embedding_init = nn.initializers.normal(1.0)  # torch nn.Embedding: N(0, 1), untouched by init_net


def host_random_variables(module: nn.Module, args: tuple, rng: np.random.Generator) -> Any:
  """``module.init(key, *args)``-shaped variables drawn on the host with NumPy.

  Compiling ``init`` of a big net on CPU takes minutes (XLA compiles the random-bit generation of
  every array), and random weights only serve plumbing tests and benchmarks. Kernels are
  N(0, 1/fan_in), BN scales and variances 1, everything else 0.
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))).astype(leaf.dtype)
    if name in ("scale", "var", "running_vars"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
