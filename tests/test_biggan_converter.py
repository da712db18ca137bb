"""The BigGAN converter maps every key of the real biggan-deep-256 checkpoint and fails loudly.

* ``biggan_deep_256_manifest.json`` (key -> [shape, dtype] of the published 256 config) becomes a
  random ``.pth`` saved by torch; ``python -m converters``' ``convert_file`` turns it into an Orbax
  directory that restores with ``load_variables`` and runs one batch-1 forward of the full model.
* A mis-shaped, an unknown and a missing key each raise ConversionError naming the key.
* The prefixed entry points (for the ImageNet CGN's four BigGANs in one file) give the same result.
"""

from __future__ import annotations

import collections
import json
import os

import jax
import numpy as np
import pytest
import torch

from cgn_jax import checkpoints
from cgn_jax.models import biggan
from cgn_jax.models.biggan import BigGANConfig, one_hot_from_int, truncated_noise_sample
from converters.biggan import convert_biggan, convert_biggan_prefixed, read_biggan
from converters.common import ConversionError, StateDictReader, load_torch_state_dict
from converters.registry import convert_file
from conftest import load_fixture

W16 = "biggan_deep_w16"


def _random_state_dict(manifest: dict, seed: int = 0) -> "collections.OrderedDict[str, torch.Tensor]":
  """Random tensors of the manifest's shapes, plausible enough for a finite forward: statistics
  with positive variances, and spectral-norm u/v from two power iterations (so sigma ~ the top
  singular value; random u/v could give sigma ~ 0 and overflow)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for key, (shape, dtype) in manifest.items():
    assert dtype == "float32", (key, dtype)
    if key.endswith("running_vars"):
      a = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("running_means") or key.endswith("bias"):
      a = rng.normal(0, 0.1, shape)
    elif key == "generator.bn.weight":
      a = rng.uniform(0.5, 1.5, shape)
    else:
      a = rng.normal(0, 1, shape)
    arrays[key] = a.astype(np.float32)
  for key in manifest:
    if key.endswith(".weight_orig"):
      base = key[:-len("weight_orig")]
      w = arrays[key].reshape(arrays[key].shape[0], -1)
      v = rng.normal(size=w.shape[1]).astype(np.float32)
      for _ in range(2):
        u = w @ v
        u /= np.linalg.norm(u)
        v = w.T @ u
        v /= np.linalg.norm(v)
      arrays[base + "weight_u"], arrays[base + "weight_v"] = u.astype(np.float32), v.astype(np.float32)
  return collections.OrderedDict((k, torch.from_numpy(arrays[k])) for k in manifest)


def test_manifest_converts_restores_and_runs(fixtures_dir, tmp_path):
  with open(os.path.join(fixtures_dir, "biggan_deep_256_manifest.json")) as f:
    manifest = json.load(f)
  src, dst = str(tmp_path / "biggan-deep-256.pth"), str(tmp_path / "biggan_orbax")
  torch.save(_random_state_dict(manifest), src)
  meta = convert_file("biggan", src, dst)
  assert BigGANConfig.from_dict(meta["model_config"]) == BigGANConfig()  # the default 256 config

  variables = checkpoints.load_variables(dst, "biggan")
  leaves = jax.tree_util.tree_leaves(variables)
  # Every key became exactly one array (the converter's finish() rejects unused ones), numbers too.
  assert len(leaves) == len(manifest)
  assert sum(a.size for a in leaves) == sum(int(np.prod(s)) for s, _ in manifest.values())

  model, _ = biggan.load(dst)  # the model file's own loader agrees
  assert model.config == BigGANConfig()
  z = truncated_noise_sample(0, 1, 128, 0.5)
  out = jax.jit(lambda v, z, y: model.apply(v, z, y, 0.5))(variables, z, one_hot_from_int([207]))
  out = np.asarray(out)
  assert out.shape == (1, 256, 256, 3) and np.all(np.isfinite(out)) and np.abs(out).max() <= 1


def _w16(fixtures_dir) -> dict[str, np.ndarray]:
  load_fixture(fixtures_dir, W16)  # skips (fails under CI) without the fixture
  return load_torch_state_dict(os.path.join(fixtures_dir, W16 + ".pth"))


def test_wrong_shape_names_the_key(fixtures_dir):
  sd = _w16(fixtures_dir)
  key = "generator.layers.3.conv_1.weight_orig"
  sd[key] = sd[key][:, :-1]
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    convert_biggan(sd)


def test_unknown_key_names_the_key(fixtures_dir):
  sd = _w16(fixtures_dir)
  sd["generator.layers.3.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match=r"generator\.layers\.3\.extra\.weight"):
    convert_biggan(sd)


def test_missing_key_names_the_key(fixtures_dir):
  sd = _w16(fixtures_dir)
  del sd["generator.layers.9.bn_2.offset.weight_v"]
  with pytest.raises(ConversionError, match=r"generator\.layers\.9\.bn_2\.offset\.weight_v"):
    convert_biggan(sd)


def test_prefixed_conversion_for_cgn_checkpoints(fixtures_dir):
  sd = _w16(fixtures_dir)
  plain_vars, plain_cfg = convert_biggan(sd)
  both = {**{"f_shape." + k: v for k, v in sd.items()}, **{"f_bg." + k: v for k, v in sd.items()},
          "u2net.some.weight": np.zeros(1, np.float32)}
  vars_a, cfg_a = convert_biggan_prefixed(both, "f_shape.")  # keys outside the prefix are ignored
  assert cfg_a == plain_cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, vars_a, plain_vars)
  # One shared reader over a whole CGN file: each BigGAN read under its prefix, finish() once.
  r = StateDictReader(both, "imagenet_cgn")
  for prefix in ("f_shape.", "f_bg."):
    r.prefix = prefix
    read_biggan(r)
  r.prefix = ""
  with pytest.raises(ConversionError, match=r"u2net\.some\.weight"):
    r.finish()
