"""Grid of BigGAN-deep samples: rows are classes, columns independent noise draws.

Works from a converted Orbax dir, the authors'/published ``.pth`` (converted on first use), or random
weights (empty ``checkpoint``), so the same job shows a checkpoint's samples and tests the plumbing.
The truncation's statistics-row selection (the authors' float64 arithmetic) is computed on the host
and passed in as data, so any truncation reuses the one compiled forward.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cgn_jax.data.sheets import save_image_grid
from cgn_jax.models import biggan
from cgn_jax.models.biggan import BigGAN, BigGANConfig, stat_selection, truncated_noise_sample


def _model(config: ml_collections.ConfigDict, workdir: str) -> tuple[BigGANConfig, dict]:
  """(architecture, variables) of ``config.checkpoint``, or random ``config.model`` weights when it
  is empty (noise images, for testing the plumbing)."""
  if config.checkpoint:
    model, variables = biggan.load(config.checkpoint, os.path.join(workdir, "converted"))
    return model.config, variables
  m = config.model.to_dict() if config.get("model") else {}
  cfg = BigGANConfig.deep(m.get("output_dim", 256), m.get("channel_width", 128))
  return cfg, biggan.init_variables(cfg, config.seed)


def sample_grid(cfg: BigGANConfig, variables: dict, classes, n_per_class: int, truncation: float,
                seed: int, batch_size: int = 8, dtype=jnp.float32) -> np.ndarray:
  """[len(classes) * n_per_class, H, W, 3] images in [-1, 1], class by class."""
  model = BigGAN(cfg, dtype=dtype)
  ys = np.repeat(np.asarray(classes, np.int32), n_per_class)
  z = truncated_noise_sample(jax.random.key(seed), len(ys), cfg.z_dim, truncation)
  # The authors' float64 row selection, computed here once and passed in as data.
  sel = stat_selection(truncation, cfg.n_stats)
  fwd = jax.jit(lambda v, z, y, s: model.apply(v, z, y, s))
  out = []
  for i in range(0, len(ys), batch_size):
    zb, yb = z[i:i + batch_size], ys[i:i + batch_size]
    pad = batch_size - len(yb)  # one shape for every batch: one compilation
    zb = jnp.pad(zb, ((0, pad), (0, 0)))
    yb = np.pad(yb, (0, pad))
    out.append(np.asarray(fwd(variables, zb, yb, sel))[:batch_size - pad])
  return np.concatenate(out)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``<workdir>/samples/<sheet_name>`` and returns its path."""
  cfg, variables = _model(config, workdir)
  bad = [c for c in config.classes if not 0 <= c < cfg.num_classes]
  if bad:
    raise ValueError(f"classes {bad} outside 0..{cfg.num_classes - 1}")
  images = sample_grid(cfg, variables, config.classes, config.n_per_class, config.truncation,
                       config.seed, config.batch_size, jnp.dtype(config.dtype))
  path = os.path.join(workdir, "samples", config.sheet_name)
  save_image_grid(path, images, nrow=config.n_per_class)
  logging.info("wrote %s", path)
  print(f"BigGAN samples (rows: classes {list(config.classes)}, truncation {config.truncation}): "
        f"{path}")
  return path
