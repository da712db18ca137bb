"""Classifiers: the authors' MNIST CNN (mnists/models/classifier.py).

The ImageNet invariant ensemble (ResNet-50 backbone with shape/texture/background heads) is in
``cgn_jax/models/resnet.py``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from cgn_jax.models import init as inits
from cgn_jax.models import loading
from cgn_jax.models.layers import Conv2d, TorchBatchNorm, avg_pool_floor, max_pool_torch

Array = jax.Array


class MnistCNN(nn.Module):
  """BN on the input, four convs, AvgPool2d(7), linear, log-softmax; torch default init."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    def conv(name, cout, k, s, x):
      return Conv2d(cout, k, s, k // 2, name=name, kernel_init=inits.kernel_init("torch_default", 0),
                    bias_init=inits.bias_init("torch_default", k * k * x.shape[-1]))(x)
    x = TorchBatchNorm(name="bn_in")(x, train)
    x = nn.relu(conv("conv0", 32, 5, 1, x))
    x = max_pool_torch(x, 3, 2, padding=1)
    x = nn.relu(conv("conv1", 32, 3, 1, x))
    x = nn.relu(conv("conv2", 64, 3, 2, x))
    x = nn.relu(conv("conv3", 64, 3, 1, x))
    x = avg_pool_floor(x, 7)  # the 8x8 map's top-left 7x7 window only
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.num_classes, name="fc", kernel_init=inits.kernel_init("torch_default", 0),
                 bias_init=inits.bias_init("torch_default", x.shape[-1]))(x)
    return jax.nn.log_softmax(x, axis=-1)


def load(checkpoint: str, cache_dir: str | None = None,
         **module_kwargs: Any) -> tuple[MnistCNN, Any]:
  """The MNIST CNN from a converted dir or the authors' ``.pth`` (family ``mnist_classifier``,
  converted once into ``cache_dir``; ``None`` is ``loading.default_cache_dir()``).

  Returns:
    ``(module, variables)``, the module built from the stored ``model_config``.
  """
  variables, meta = loading.load_converted(checkpoint, "mnist_classifier", cache_dir)
  return MnistCNN(**meta["model_config"], **module_kwargs), variables
