"""The ImageNet CGN converter splits cgn.pth into its five models, maps every key, and fails loudly.

* A small synthetic ``cgn.pth`` (the w16 BigGAN fixture under the four BigGAN prefixes, each copy
  scaled differently so a swapped mapping shows, and the U2NETP fixture under ``u2net.``) goes
  through ``python -m converters imagenet_cgn``; every subtree must equal the stand-alone BigGAN /
  U2-Net conversion of its own part, before and after the Orbax round trip, with or without
  DataParallel's ``module.`` prefix.
* Unknown, missing and mis-shaped keys, mixed ``module.`` prefixes and BigGANs of different widths
  each raise ConversionError naming the key or module.
* The full-size layout (four BigGAN-deep-256 + U2NET, from the key manifests) converts without
  allocating the ~1.1 GB of a real checkpoint: every tensor is a zero-stride view of one number.
"""

from __future__ import annotations

import json
import os
import re
import time
import tracemalloc

import jax
import numpy as np
import pytest
import torch

from cgn_jax import checkpoints
from cgn_jax.models import imagenet_cgn
from cgn_jax.models.biggan import BigGANConfig
from cgn_jax.models.imagenet_cgn import CGNConfig
from converters.__main__ import main as converters_main
from converters.biggan import convert_biggan
from converters import registry
from converters.common import ConversionError, load_torch_state_dict
from converters.imagenet_cgn import BIGGANS, convert_imagenet_cgn
from converters.registry import convert_state_dict
from converters.u2net import convert_u2net
from conftest import load_fixture

# A different factor per BigGAN: identical copies would hide a mapping that swaps two of them.
SCALES = {"biggan_GT": 1.0, "f_shape": 3.0, "f_text": 2.0, "f_bg": -1.0}


@pytest.fixture(scope="module")
def parts(fixtures_dir) -> dict[str, dict[str, np.ndarray]]:
  """The five submodules' state dicts (unprefixed), built from the w16 BigGAN and U2NETP fixtures."""
  for stem in ("biggan_deep_w16", "u2netp"):
    load_fixture(fixtures_dir, stem)  # skips (fails under CI) without the fixture
  w16 = load_torch_state_dict(os.path.join(fixtures_dir, "biggan_deep_w16.pth"))
  out = {name: {k: v * np.float32(s) for k, v in w16.items()} for name, s in SCALES.items()}
  out["u2net"] = load_torch_state_dict(os.path.join(fixtures_dir, "u2netp.pth"))
  return out


def _combine(parts: dict[str, dict[str, np.ndarray]], outer: str = "") -> dict[str, np.ndarray]:
  return {f"{outer}{name}.{k}": v for name, part in parts.items() for k, v in part.items()}


@pytest.fixture(scope="module")
def cgn_sd(parts) -> dict[str, np.ndarray]:
  return _combine(parts)


@pytest.fixture(scope="module")
def expected(parts) -> dict[str, tuple[dict, dict]]:
  """Each part converted on its own by its family's converter: the reference for every subtree."""
  out = {name: convert_biggan(parts[name]) for name in BIGGANS}
  out["u2net"] = convert_u2net(parts["u2net"])
  return out


def _assert_trees_equal(actual, reference, name: str) -> None:
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(reference), name
  def check(a, r):
    a, r = np.asarray(a), np.asarray(r)
    assert a.dtype == r.dtype, (name, a.dtype, r.dtype)
    np.testing.assert_array_equal(a, r, err_msg=name)
  jax.tree_util.tree_map(check, actual, reference)


def _assert_matches_parts(variables: dict, expected: dict[str, tuple[dict, dict]]) -> None:
  assert set(variables) == {"params", "batch_stats"}
  for col in ("params", "batch_stats"):
    assert set(variables[col]) == set(expected), col
    for name, (ref, _) in expected.items():
      _assert_trees_equal(variables[col][name], ref[col], f"{col}/{name}")


def test_cli_converts_and_restores(cgn_sd, expected, tmp_path):
  src, dst = str(tmp_path / "cgn.pth"), str(tmp_path / "cgn_orbax")
  torch.save({k: torch.from_numpy(v) for k, v in cgn_sd.items()}, src)
  assert converters_main(["imagenet_cgn", src, dst]) == 0  # `python -m converters imagenet_cgn ...`

  config = {"biggan": expected["f_shape"][1], "u2net": expected["u2net"][1]}
  assert config["u2net"]["variant"] == "u2netp" and config["biggan"]["channel_width"] == 16
  assert checkpoints.load_meta(dst)["model_config"] == config
  restored = checkpoints.load_variables(dst, "imagenet_cgn")
  _assert_matches_parts(restored, expected)
  # Every torch key became exactly one array.
  assert len(jax.tree_util.tree_leaves(restored)) == len(cgn_sd)


def test_loader_reads_the_file_once_and_the_dir_alike(cgn_sd, expected, tmp_path, monkeypatch):
  """``imagenet_cgn.load``: cgn.pth converted into the cache once; the directory gives the same."""
  src, cache = str(tmp_path / "cgn.pth"), str(tmp_path / "converted")
  torch.save({k: torch.from_numpy(v) for k, v in cgn_sd.items()}, src)
  module, from_file = imagenet_cgn.load(src, cache)
  assert module.config == CGNConfig.from_dict(
      {"biggan": expected["f_shape"][1], "u2net": expected["u2net"][1]})
  _assert_matches_parts(from_file, expected)
  dir_module, from_dir = imagenet_cgn.load(os.path.join(cache, "imagenet_cgn_cgn"))
  assert dir_module == module
  _assert_trees_equal(from_dir, from_file, "dir vs file")
  monkeypatch.setattr(registry, "convert_file", lambda *a: pytest.fail(f"converted again: {a}"))
  _assert_trees_equal(imagenet_cgn.load(src, cache)[1], from_file, "cached")


def test_in_memory_and_data_parallel_keys_agree(cgn_sd, parts, expected):
  variables, config = convert_state_dict("imagenet_cgn", cgn_sd)
  _assert_matches_parts(variables, expected)
  dp_variables, dp_config = convert_imagenet_cgn(_combine(parts, outer="module."))
  assert dp_config == config
  _assert_trees_equal(dp_variables, variables, "module.-prefixed")


def _raises(sd: dict[str, np.ndarray], pattern: str) -> ConversionError:
  with pytest.raises(ConversionError, match=pattern) as info:
    convert_imagenet_cgn(sd)
  assert "\n" not in str(info.value)  # one line
  return info.value


def test_unknown_top_level_key_names_the_key(cgn_sd):
  _raises({**cgn_sd, "f_extra.weight": np.zeros(3, np.float32)}, r"unknown key 'f_extra\.weight'")


def test_unknown_key_inside_a_submodule_names_the_key(cgn_sd):
  key = "f_text.generator.layers.3.extra.weight"
  _raises({**cgn_sd, key: np.zeros(3, np.float32)}, re.escape(f"unknown key '{key}'"))


def test_missing_key_names_the_key(cgn_sd):
  sd = dict(cgn_sd)
  del sd["f_bg.generator.layers.9.bn_2.offset.weight_v"]
  _raises(sd, r"missing key 'f_bg\.generator\.layers\.9\.bn_2\.offset\.weight_v'")


def test_missing_submodule_is_named(cgn_sd):
  _raises({k: v for k, v in cgn_sd.items() if not k.startswith("u2net.")}, r"no keys under 'u2net\.'")


@pytest.mark.parametrize("key", ["f_shape.generator.layers.3.conv_1.weight_orig",
                                 "u2net.stage3d.rebnconv2d.conv_s1.weight"])
def test_wrong_shape_names_the_key(cgn_sd, key):
  sd = dict(cgn_sd)
  sd[key] = sd[key][:, :-1]
  _raises(sd, re.escape(key) + ".*shape")


def test_mixed_data_parallel_prefix_names_the_key(cgn_sd):
  bare = "f_text.embeddings.weight"
  sd = {(k if k == bare else "module." + k): v for k, v in cgn_sd.items()}
  _raises(sd, re.escape(f"'{bare}' lacks the DataParallel prefix"))


# ---------------------------------------------------------------------------------------------
# Full size, from the key manifests, without the memory of a real checkpoint.

def _manifest(fixtures_dir: str, name: str) -> dict[str, tuple[list[int], str]]:
  with open(os.path.join(fixtures_dir, name)) as f:
    return json.load(f)


def _views(manifest, value: float, prefix: str) -> dict[str, np.ndarray]:
  """Every key of ``manifest`` as a read-only zero-stride view of one number: shapes without bytes."""
  return {prefix + k: np.broadcast_to(np.asarray(value, dtype), shape)
          for k, (shape, dtype) in manifest.items()}


def test_full_size_checkpoint_maps_every_key(fixtures_dir):
  biggan_m = _manifest(fixtures_dir, "biggan_deep_256_manifest.json")
  u2net_m = _manifest(fixtures_dir, "u2net_manifest.json")
  # One distinct value per submodule, so that the routing of every tensor is checked at full size.
  values = {name: float(i + 1) for i, name in enumerate(BIGGANS + ("u2net",))}
  sd = {}
  for name in BIGGANS:
    sd.update(_views(biggan_m, values[name], name + "."))
  sd.update(_views(u2net_m, values["u2net"], "u2net."))
  full_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize
                   for m, n in ((biggan_m, 4), (u2net_m, 1)) for s, d in m.values() for _ in range(n))

  tracemalloc.start()
  try:
    start = time.perf_counter()
    variables, config = convert_imagenet_cgn(sd)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # Transposing kernels (OIHW -> HWIO, (out,in) -> (in,out)) has to materialise them (~1.0 GB of
  # the ~1.1 GB); anything beyond one copy of the checkpoint would be a converter doing it twice.
  assert peak < 1.1 * full_bytes, f"peak {peak / 2**20:.0f} MiB for a {full_bytes / 2**20:.0f} MiB checkpoint"
  assert seconds < 30, f"conversion took {seconds:.1f} s"

  assert config["u2net"] == {"variant": "u2net", "out_ch": 1}
  assert config["biggan"]["channel_width"] == 128 and config["biggan"]["output_dim"] == 256
  assert BigGANConfig.from_dict(config["biggan"]) == BigGANConfig()  # the published 256 model

  leaves = jax.tree_util.tree_leaves(variables)
  assert len(leaves) == len(sd) == 4 * len(biggan_m) + len(u2net_m)
  assert sum(a.size for a in leaves) == sum(a.size for a in sd.values())
  for name, value in values.items():
    for col in ("params", "batch_stats"):
      for path, leaf in jax.tree_util.tree_leaves_with_path(variables[col][name]):
        assert np.all(np.asarray(leaf) == value), (name, col, jax.tree_util.keystr(path))


def test_biggans_of_different_widths_name_the_module(cgn_sd, fixtures_dir):
  """f_shape at the real width 128 next to w16 copies: a valid BigGAN, but not the same model."""
  sd = {k: v for k, v in cgn_sd.items() if not k.startswith("f_shape.")}
  sd.update(_views(_manifest(fixtures_dir, "biggan_deep_256_manifest.json"), 0.0, "f_shape."))
  _raises(sd, r"BigGAN 'f_shape' differs from 'biggan_GT' \(channel_width 128 vs 16\)")


def test_layout_is_what_the_flax_model_asks_for(cgn_sd):
  """The converted tree has the CGN's submodule names and, under each, exactly the variables its
  Flax module asks for (one abstract BigGAN and one U2-Net init; tracing the whole CGN costs ~4x)."""
  from cgn_jax.models import imagenet_cgn  # pylint: disable=import-outside-toplevel
  from cgn_jax.models.biggan import BigGAN  # pylint: disable=import-outside-toplevel
  from cgn_jax.models.u2net import U2Net  # pylint: disable=import-outside-toplevel
  variables, config = convert_imagenet_cgn(cgn_sd)
  cgn_config = imagenet_cgn.CGNConfig.from_dict(config)
  assert cgn_config.to_dict() == config
  names = set(imagenet_cgn.MECHANISMS + imagenet_cgn.FROZEN)
  assert set(variables["params"]) == set(variables["batch_stats"]) == names
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), t)
  z = np.zeros((1, cgn_config.biggan.z_dim), np.float32)
  y = np.zeros((1, cgn_config.biggan.num_classes), np.float32)
  gan = shapes(jax.eval_shape(BigGAN(cgn_config.biggan).init, jax.random.key(0), z, y, 0.5))
  x = np.zeros((1, 32, 32, 3), np.float32)
  mask_net = shapes(jax.eval_shape(U2Net(cgn_config.u2net_variant).init, jax.random.key(0), x))
  for name in names:
    expected = mask_net if name == "u2net" else gan
    got = {col: variables[col][name] for col in ("params", "batch_stats")}
    assert shapes(got) == expected, name
