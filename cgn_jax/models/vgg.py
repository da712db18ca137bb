"""VGG16 feature extractor for CGN's perceptual (content / Gram-style) and texture losses.

The authors' ``shared/losses.py::PerceptualLoss`` hooks torchvision's ``vgg16(True).features`` at the
module just before each of the first four MaxPools, i.e. the ReLU outputs at torchvision indices
[3, 8, 15, 22]. Only those four activations matter, so this module stops after ReLU 22: block 5
(convs 24-28) can never influence a loss and has no parameters here.

Two traps of the original are kept on purpose:
* Images go in as they come out of the generators, in [-1, 1], with **no** ImageNet mean/std
  normalisation (torchvision's pretrained weights expect normalised [0, 1] input; CGN never does it).
* The hooks store the activations *after* the in-place ReLU, so they are post-ReLU.

Parameters are named after the torchvision index of each conv (``conv_0`` ... ``conv_21``) so that a
converted key can be traced back to ``features.<idx>.weight`` by eye.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from cgn_jax.models import loading
from cgn_jax.models.layers import max_pool_torch

Array = jax.Array

# (output widths, torchvision indices of the convs) per block; each conv is followed by a ReLU at
# index + 1 and each block by a MaxPool2d(2, 2). The last ReLU of block b is the b-th hook.
BLOCKS: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
    ((64, 64), (0, 2)),
    ((128, 128), (5, 7)),
    ((256, 256, 256), (10, 12, 14)),
    ((512, 512, 512), (17, 19, 21)),
)
HOOKED_LAYER_IDS: tuple[int, ...] = tuple(ids[-1] + 1 for _, ids in BLOCKS)  # (3, 8, 15, 22)
FAMILY = "vgg16"

FeaturesFn = Callable[[Array, int], Sequence[Array]]


class VGG16Features(nn.Module):
  """torchvision ``vgg16().features`` up to ReLU 22, returning the hooked activations (NHWC).

  Attributes:
    dtype: compute dtype of the convolutions (parameters stay float32).
    precision: ``jax.lax.Precision`` of the convolutions; ``None`` is XLA's default, which may use
      TF32 on recent GPUs. Pass ``'highest'`` for float32 parity there.
  """
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, num_blocks: int = 4) -> list[Array]:
    """Runs blocks 1..``num_blocks`` (a Python int, static) and returns their last ReLU outputs.

    Asking for fewer blocks skips the deeper, most expensive convolutions; losses do so when the
    deeper layers' weights are zero. Initialise with the default ``num_blocks=4``.
    """
    if not 1 <= num_blocks <= len(BLOCKS):
      raise ValueError(f"num_blocks must be in 1..{len(BLOCKS)}, got {num_blocks}")
    x = x.astype(self.dtype)
    feats = []
    for b, (widths, ids) in enumerate(BLOCKS[:num_blocks]):
      if b:
        x = max_pool_torch(x, 2, 2)  # floor mode: an odd trailing row/column is dropped, as in torch
      for width, idx in zip(widths, ids):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    precision=self.precision, name=f"conv_{idx}")(x)
        x = nn.relu(x)
      feats.append(x)
    return feats


def features_fn(variables: Any, module: VGG16Features | None = None) -> FeaturesFn:
  """Closes over frozen VGG variables: ``fn(images, num_blocks=4) -> [hooked activations]``.

  The variables are wrapped in ``stop_gradient``: like the authors' ``requires_grad(model, False)``,
  the extractor is never trained, while gradients still flow to the images.
  """
  module = VGG16Features() if module is None else module

  def fn(images: Array, num_blocks: int = 4) -> list[Array]:
    frozen = jax.tree_util.tree_map(jax.lax.stop_gradient, variables)
    return module.apply(frozen, images, num_blocks=num_blocks)

  return fn


def init_variables(key: Array) -> Any:
  """Random variables with Flax's default conv init (lecun-normal kernels, zero biases).

  For tests and for runs without converted weights. All kernels come from one draw: per-shape
  ``Module.init`` compiles a generator per conv shape and takes tens of seconds on a 2-core CPU.
  """
  shapes, cin = {}, 3
  for widths, ids in BLOCKS:
    for cout, idx in zip(widths, ids):
      shapes[f"conv_{idx}"], cin = (3, 3, cin, cout), cout
  sizes = [int(np.prod(s)) for s in shapes.values()]
  # lecun_normal: truncated to +-2 std, rescaled so that the std is sqrt(1 / fan_in).
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32) / 0.87962566103423978
  params, offset = {}, 0
  for (name, shape), size in zip(shapes.items(), sizes):
    fan_in = shape[0] * shape[1] * shape[2]
    params[name] = {"kernel": flat[offset:offset + size].reshape(shape) * np.sqrt(1.0 / fan_in),
                    "bias": jnp.zeros((shape[-1],), jnp.float32)}
    offset += size
  return {"params": params}


def load(checkpoint: str, cache_dir: str | None = None,
         **module_kwargs: Any) -> tuple[VGG16Features, Any]:
  """VGG16 features from a converted dir or torchvision's ``vgg16-397923af.pth`` (converted once
  into ``cache_dir``, see ``loading.converted_dir``).

  Args:
    checkpoint: the directory or the ``.pth``.
    cache_dir: where a ``.pth`` is converted to; ``None`` is ``loading.default_cache_dir()``.
    **module_kwargs: ``VGG16Features`` fields such as ``dtype`` and ``precision``.

  Returns:
    ``(module, variables)``; use ``features_fn(variables, module)`` for the losses.
  """
  variables, meta = loading.load_converted(checkpoint, FAMILY, cache_dir)
  return VGG16Features(**meta.get("model_config", {}), **module_kwargs), variables


def load_features_fn(checkpoint: str, cache_dir: str | None, key: Array,
                     dtype: Any = jnp.float32) -> FeaturesFn:
  """The perceptual losses' feature function from :func:`load`; random weights (from ``key``)
  with a loud warning when ``checkpoint`` is empty.

  With random weights the perceptual and texture losses still run but compare random features,
  which is not what the authors trained with (they use ImageNet-pretrained VGG16).
  """
  if checkpoint:
    module, variables = load(checkpoint, cache_dir, dtype=dtype)
    return features_fn(variables, module)
  logging.warning(
      "No VGG16 checkpoint configured: the perceptual/texture losses use RANDOM VGG16 features. "
      "Convert torchvision's vgg16 weights with `python -m converters vgg16 vgg16-397923af.pth DIR` "
      "and set the config's VGG path to DIR.")
  return features_fn(init_variables(key), VGG16Features(dtype=dtype))
