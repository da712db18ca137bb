"""Sample sheet of an MNIST CGN: masks, foregrounds, backgrounds and composites for every class.

Works from the authors' ``.pth`` (converted on first use), a converted Orbax dir, or random weights
(empty ``checkpoint``), so the same job shows what a checkpoint has learned and tests the plumbing.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from cgn_jax.data.sheets import mnist_cgn_sheet
from cgn_jax.models import mnist_cgn


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  fields = config.model.to_dict() if config.get("model") else None
  model, variables = mnist_cgn.load_or_init(config.checkpoint, os.path.join(workdir, "converted"),
                                            config.seed, fields)
  path = os.path.join(workdir, "samples", config.sheet_name)
  mnist_cgn_sheet(model, variables, jax.random.key(config.seed), path, config.n_per_class,
               model.n_classes)
  logging.info("wrote %s", path)
  print(f"sample sheet (rows: classes 0-{model.n_classes - 1}; per sample the columns mask, "
        f"foreground, background, composite, {config.n_per_class} samples per row): {path}")
  return path
