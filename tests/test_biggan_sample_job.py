"""The BigGAN sampling job end to end on its ``:tiny`` config (random weights, width 4, 128 px),
and the host-side random initialisation it uses."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cgn_jax.jobs import sample_biggan
from cgn_jax.models.biggan import BigGAN, BigGANConfig, init_variables

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant: str):
  spec = importlib.util.spec_from_file_location("biggan_sample_cfg",
                                                os.path.join(_ROOT, "configs", "biggan_sample.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def test_tiny_sample_grid_png(tmp_path):
  config = _config("tiny")
  path = sample_biggan.run(config, str(tmp_path))
  assert os.path.isfile(path) and path.endswith(".png")
  res, pad = config.model.output_dim, 2  # save_image_grid's default 2-pixel border
  with Image.open(path) as im:
    assert im.mode == "RGB"
    assert im.size == (config.n_per_class * (res + pad) + pad,
                       len(config.classes) * (res + pad) + pad)


def test_init_variables_gives_converged_spectral_norms():
  """Random weights for the job: every u, v is (nearly) the top singular pair of torch's weight
  matrix, so sigma = u^T W v is close to the largest singular value (a layout mix-up would not be)."""
  # gen_z always gives 16*ch channels, and a shrinking block halves them.
  cfg = BigGANConfig(output_dim=64, channel_width=4, attention_layer_position=2,
                     layers=((False, 16, 16), (True, 16, 8), (True, 8, 4), (True, 4, 2), (True, 2, 1)))
  variables = init_variables(cfg, seed=3)
  flat_p = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  n = 0
  for path, u in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
    if path[-1].key != "u":
      continue
    stats_path = path[:-1]
    kernel = np.asarray(flat_p[stats_path + (jax.tree_util.DictKey("kernel"),)])
    w = kernel.T if kernel.ndim == 2 else np.transpose(kernel, (3, 2, 0, 1))  # torch layout
    w = w.reshape(w.shape[0], -1)
    node = variables["batch_stats"]
    for p in stats_path:
      node = node[p.key]
    sigma = float(np.asarray(node["u"]) @ w @ np.asarray(node["v"]))
    top = float(np.linalg.svd(w, compute_uv=False)[0])
    assert 0.8 * top <= sigma <= top * (1 + 1e-5), (jax.tree_util.keystr(stats_path), sigma, top)
    n += 1
  assert n == 1 + 5 * 12 + 4 + 1  # gen_z, 5 GenBlocks, attention, conv_to_rgb
  out = jax.jit(lambda v, z, y: BigGAN(cfg).apply(v, z, y, 0.5))(
      variables, jnp.zeros((2, cfg.z_dim)), jnp.array([0, 5]))
  assert out.shape == (2, 64, 64, 3) and bool(jnp.all(jnp.isfinite(out)))
