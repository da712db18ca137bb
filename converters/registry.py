"""Names of the convertible families and the one function that turns a .pth into an Orbax dir.

Each family is ``module:function`` with ``function(state_dict) -> (variables, model_config)``:
``variables`` is a Flax variables dict (``params``, ``batch_stats``) of numpy arrays and
``model_config`` a JSON-able dict of the constructor arguments read off the tensor shapes. Imports
are lazy so that one family's optional dependencies never break another.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import numpy as np

from converters.common import ConversionError, load_torch_state_dict

FAMILIES: dict[str, str] = {
    "mnist_cgn": "converters.mnist:convert_mnist_cgn",
    "disc_lin": "converters.mnist:convert_disc_lin",
    "disc_conv": "converters.mnist:convert_disc_conv",
    "mnist_classifier": "converters.mnist:convert_mnist_classifier",
    "vgg16": "converters.vgg:convert_vgg16",
    "biggan": "converters.biggan:convert_biggan",
    "u2net": "converters.u2net:convert_u2net",
    "imagenet_cgn": "converters.imagenet_cgn:convert_imagenet_cgn",
    "resnet50": "converters.resnet:convert_resnet50",
    "invariant_ensemble": "converters.resnet:convert_invariant_ensemble",
    "inception_v3": "converters.inception:convert_inception_v3",
    "inception_v3_fid": "converters.inception:convert_inception_v3_fid",
}


def family_fn(family: str) -> Callable[[Mapping[str, np.ndarray]], tuple[dict, dict]]:
  if family not in FAMILIES:
    raise ConversionError(f"unknown family '{family}'; choose one of: {', '.join(FAMILIES)}")
  module, fn = FAMILIES[family].split(":")
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError) as e:
    raise ConversionError(f"family '{family}' is not available in this version ({e})") from e


def convert_state_dict(family: str, state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """Maps a torch state dict (numpy arrays) onto Flax variables; raises ConversionError."""
  return family_fn(family)(state_dict)


def convert_file(family: str, src: str, dst: str) -> dict[str, Any]:
  """Converts ``src`` (.pth) into the Orbax directory ``dst``; returns the stored metadata."""
  fn = family_fn(family)
  variables, model_config = fn(load_torch_state_dict(src))
  # Orbax (and JAX) only once the input is known good: a bad file fails in a fraction of a second.
  from cgn_jax import checkpoints  # pylint: disable=import-outside-toplevel
  meta = {"family": family, "source": src, "model_config": model_config}
  checkpoints.save_variables(dst, variables, meta)
  return meta
