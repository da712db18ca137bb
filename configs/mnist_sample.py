"""Sample sheet of the authors' pretrained colored-MNIST CGN.

  python -m cgn_jax.main --config configs/mnist_sample.py --workdir /tmp/cgn_sample

converts ``<data_dir>/pretrained/mnist_cgn/colored_MNIST.pth`` (needs the ``convert`` extra) and writes
``samples/mnist_cgn_sheet.png``: one row per digit; per sample the columns mask / foreground /
background / composite, ``n_per_class`` samples side by side (2: 8 columns).
Expect thin digit masks, saturated class colours (crimson 0, teal 1, lemon 2, ...) and black
backgrounds (the Colored-MNIST background). A few seconds on a laptop CPU.
Variants: ``:double_colored``, ``:wildlife`` (the other published checkpoints), ``:tiny`` (random
weights, tiny width; used by tests).
"""

import os

import ml_collections

from configs.common import DATA_DIR, check_variant

# The variant names the published checkpoint; ``tiny`` has none (random weights).
_CHECKPOINTS = {"colored": "colored_MNIST", "double_colored": "double_colored_MNIST",
                "wildlife": "wildlife_MNIST", "tiny": ""}
VARIANTS = tuple(_CHECKPOINTS)


def get_config(variant: str = "colored") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.job = "sample_mnist"
  c.data_dir = DATA_DIR
  c.checkpoint = (os.path.join(DATA_DIR, "pretrained", "mnist_cgn", f"{_CHECKPOINTS[variant]}.pth")
                  if _CHECKPOINTS[variant] else "")
  c.seed = 0
  c.n_per_class = 2
  c.sheet_name = "mnist_cgn_sheet.png"
  # Used only without a checkpoint (random weights); defaults of mnists/models/cgn.py::CGN.
  c.model = ml_collections.ConfigDict(dict(n_classes=10, latent_sz=32, ngf=4 if variant == "tiny" else 32,
                                           img_sz=32, init_type="orthogonal", init_gain=0.1))
  c.lock()
  return c
