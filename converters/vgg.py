"""torchvision VGG16 -> ``cgn_jax.models.vgg.VGG16Features`` (family ``vgg16``).

Accepted inputs:
* a full torchvision ``vgg16`` state dict (``features.N.*`` and ``classifier.*``), e.g. the
  ImageNet checkpoint ``vgg16-397923af.pth`` that the authors' ``vgg16(True)`` downloads;
* the state dict of ``vgg16().features`` (keys ``N.weight`` without prefix), complete or truncated
  after layer 21 like the ``vgg16_features.pth`` fixture.

Keys that are known but deliberately not converted (their shapes are still checked, so a foreign
checkpoint fails loudly): ``classifier.*`` (the perceptual losses never reach the classifier) and the
block-5 convs ``features.24/26/28`` (they come after the last hooked ReLU 22, so they cannot influence
any hooked activation or loss). Anything else unknown, missing or mis-shaped raises a
``ConversionError`` naming the key.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from converters.common import StateDictReader
from cgn_jax.models.vgg import BLOCKS, FAMILY

# Block 5 of torchvision's vgg16.features: (torch index, in, out).
_BLOCK5 = ((24, 512, 512), (26, 512, 512), (28, 512, 512))
# torchvision vgg16.classifier Linear layers: (torch index, in features); out of the last one is the
# number of classes, which is free.
_CLASSIFIER = ((0, 512 * 7 * 7, 4096), (3, 4096, 4096), (6, 4096, None))


def convert_vgg16(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """Maps a torchvision vgg16 (or ``vgg16().features``) state dict onto ``VGG16Features``.

  Args:
    state_dict: torch key -> numpy array; floats of any precision (the fixture is float16) are
      cast to float32.

  Returns:
    ``({'params': {'conv_<idx>': {'kernel', 'bias'}}}, model_config)``; ``model_config`` is empty
    because VGG16's widths are fixed.
  """
  sd = {k: (np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else v)
        for k, v in state_dict.items()}
  full = any(k.startswith("features.") for k in sd)
  reader = StateDictReader(sd, FAMILY, prefix="features." if full else "")

  params = {}
  cin = 3
  for widths, ids in BLOCKS:
    for cout, idx in zip(widths, ids):
      params[f"conv_{idx}"] = reader.conv(str(idx), cin, cout, 3)
      cin = cout

  for idx, ci, co in _BLOCK5:  # optional: present in full checkpoints, absent in the fixture
    if reader.has(f"{idx}.weight") or reader.has(f"{idx}.bias"):
      reader.conv(str(idx), ci, co, 3)

  if full:  # the classifier is optional too (a features-only model saved under its attribute name)
    head = StateDictReader(sd, FAMILY, prefix="classifier.")
    for idx, fin, fout in _CLASSIFIER:
      w = f"{idx}.weight"
      if fout is None and head.has(w) and np.ndim(sd["classifier." + w]) == 2:
        fout = int(np.shape(sd["classifier." + w])[0])  # any number of classes
      if head.has(w) or head.has(f"{idx}.bias"):  # shape-checked, never transposed (411 MB)
        head.take(w, (fout or 1000, fin))
        head.take(f"{idx}.bias", (fout or 1000,))
    reader.used |= head.used
  reader.finish()
  return {"params": params}, {}
