"""Sample sheet of an MNIST CGN: masks, foregrounds, backgrounds and composites for every class.

Works from the authors' ``.pth`` (converted on first use), a converted Orbax dir, or random weights
(empty ``checkpoint``), so the same job shows what a checkpoint has learned and tests the plumbing.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cgn_jax import checkpoints
from cgn_jax.composer import compose
from cgn_jax.data.sheets import save_image_grid
from cgn_jax.models.mnist_cgn import MnistCGN, init_variables


def load_cgn(checkpoint: str, workdir: str, model_cfg: ml_collections.ConfigDict | None = None,
             seed: int = 0) -> tuple[MnistCGN, dict]:
  """An MnistCGN and its variables from ``checkpoint`` (.pth / Orbax dir) or random init if empty."""
  if checkpoint:
    variables, meta = checkpoints.load_or_convert(checkpoint, "mnist_cgn",
                                                  os.path.join(workdir, "converted"))
    return MnistCGN(**meta["model_config"]), variables
  model = MnistCGN(**(model_cfg.to_dict() if model_cfg else {}))
  return model, init_variables(model, jax.random.key(seed))


def sample_sheet(model: MnistCGN, variables: dict, key: jax.Array, path: str, n_per_class: int = 2,
                 n_classes: int = 10, train: bool = False) -> str:
  """Rows = classes; per sample four columns: mask, foreground, background, composite."""
  ys = jnp.repeat(jnp.arange(n_classes), n_per_class)
  out = model.apply(variables, ys, key, train=train, mutable=["batch_stats"] if train else False)
  out = out[0] if train else out
  x = compose(out["mask"], out["foreground"], out["background"])
  mask = jnp.broadcast_to(out["mask"] * 2 - 1, x.shape)  # [0,1] -> [-1,1] like the images
  cols = jnp.stack([mask, out["foreground"], out["background"], x], axis=1)  # (N, 4, H, W, C)
  grid = np.asarray(cols).reshape((n_classes, n_per_class * 4) + x.shape[1:])
  return save_image_grid(path, grid.reshape((-1,) + x.shape[1:]), nrow=n_per_class * 4, scale=2)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  model, variables = load_cgn(config.checkpoint, workdir, config.get("model"), config.seed)
  path = os.path.join(workdir, "samples", config.sheet_name)
  sample_sheet(model, variables, jax.random.key(config.seed), path, config.n_per_class,
               model.n_classes)
  logging.info("wrote %s", path)
  print(f"sample sheet (rows: classes 0-{model.n_classes - 1}; columns: mask, foreground, "
        f"background, composite): {path}")
  return path
