"""VGG16 feature extractor, its converter and the perceptual loss against the ``vgg16_features*`` fixtures.

The references were computed with the authors' ``PerceptualLoss`` on a random torchvision VGG16
(README §6). Every loss config stored in a fixture is checked; the configs and their weights are
read from the npz (``loss_<name>``, ``loss_<name>_terms``, ``loss_<name>_{cont,style}_wgts``).
"""

from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, assert_close, fixture_stems, load_fixture, nchw_to_nhwc
from converters.common import ConversionError, load_torch_state_dict
from converters.registry import convert_file, convert_state_dict
from converters.vgg import convert_vgg16
from cgn_jax import losses
from cgn_jax.models import vgg

STEMS = fixture_stems("vgg16_features")


def _loss_cases() -> list[tuple[str, str]]:
  """(stem, config) pairs discovered from the npz keys at collection time."""
  cases = []
  for stem in STEMS:
    path = os.path.join(FIXTURES, stem + ".npz")
    if not os.path.isfile(path):
      cases.append((stem, "<fixture missing>"))
      continue
    with np.load(path) as z:
      names = sorted(m.group(1) for k in z.files if (m := re.fullmatch(r"loss_(.+)_terms", k)))
    cases.extend((stem, n) for n in names)
  return cases


@functools.lru_cache(maxsize=None)
def _model(fixtures_dir: str, stem: str):
  variables, config = convert_vgg16(load_torch_state_dict(os.path.join(fixtures_dir, stem + ".pth")))
  module = vgg.VGG16Features(**config)
  return module, variables


@functools.lru_cache(maxsize=None)
def _features(fixtures_dir: str, stem: str, which: str) -> list[np.ndarray]:
  module, variables = _model(fixtures_dir, stem)
  z = load_fixture(fixtures_dir, stem)
  return [np.asarray(f) for f in jax.jit(module.apply)(variables, nchw_to_nhwc(z[which]))]


@pytest.mark.parametrize("stem", STEMS)
def test_hooked_features(fixtures_dir, stem):
  z = load_fixture(fixtures_dir, stem)
  np.testing.assert_array_equal(z["hooked_layer_ids"], vgg.HOOKED_LAYER_IDS)
  feats = _features(fixtures_dir, stem, "input")
  keys = sorted(k for k in z if re.fullmatch(r"feat_input_\d+", k))
  assert keys, "fixture holds no feat_input_k"
  for key in keys:
    k = int(key.rsplit("_", 1)[1])
    expected = nchw_to_nhwc(z[key])
    # Some layers are stored for the first sample(s) only.
    assert_close(feats[k][:expected.shape[0]], expected, atol=1e-5, rtol=1e-5, name=f"{stem}:{key}")


@pytest.mark.parametrize("stem", STEMS)
def test_gram_matrices(fixtures_dir, stem):
  z = load_fixture(fixtures_dir, stem)
  keys = [k for k in z if re.fullmatch(r"gram_(input|target)_\d+", k)]
  assert keys, "fixture holds no gram_*"
  for key in keys:
    _, which, k = key.split("_")
    got = losses.gram_matrix(jnp.asarray(_features(fixtures_dir, stem, which)[int(k)]))
    assert_close(got, z[key], atol=1e-9, rtol=1e-5, name=f"{stem}:{key}")


def _weights(z, config):
  return ([float(w) for w in z[f"loss_{config}_cont_wgts"]],
          [float(w) for w in z[f"loss_{config}_style_wgts"]])


@pytest.mark.parametrize("stem,config", _loss_cases(), ids=lambda v: v)
def test_perceptual_loss(fixtures_dir, stem, config):
  z = load_fixture(fixtures_dir, stem)
  cw, sw = _weights(z, config)
  fx = [jnp.asarray(f) for f in _features(fixtures_dir, stem, "input")]
  fy = [jnp.asarray(f) for f in _features(fixtures_dir, stem, "target")]
  total, terms = losses.perceptual_loss_from_features(fx, fy, cw, sw)
  assert_close(terms, z[f"loss_{config}_terms"], atol=1e-6, rtol=1e-5, name=f"{stem}:{config} terms")
  assert_close(total, z[f"loss_{config}"], atol=1e-6, rtol=1e-5, name=f"{stem}:{config} total")
  # Static zero weights contribute exactly 0 (skipped, not multiplied).
  for i, w in enumerate(cw + sw):
    if w == 0.0:
      assert float(terms[i]) == 0.0

  # Traced weights (e.g. an array from a config) take the generic path and agree.
  traced = jax.jit(lambda a, b, c, s: losses.perceptual_loss_from_features(a, b, list(c), list(s)))(
      fx, fy, jnp.asarray(cw, jnp.float32), jnp.asarray(sw, jnp.float32))
  assert_close(traced[0], z[f"loss_{config}"], atol=1e-6, rtol=1e-5, name=f"{config} traced total")
  assert_close(traced[1], z[f"loss_{config}_terms"], atol=1e-6, rtol=1e-5, name=f"{config} traced")


@pytest.mark.parametrize("stem", STEMS)
def test_perceptual_loss_end_to_end(fixtures_dir, stem):
  """images -> VGG -> loss under jit, for the stored config with the most non-zero weights."""
  z = load_fixture(fixtures_dir, stem)
  configs = [c for s, c in _loss_cases() if s == stem]
  config = max(configs, key=lambda c: sum(w != 0 for w in sum(_weights(z, c), [])))
  cw, sw = _weights(z, config)
  module, variables = _model(fixtures_dir, stem)
  fn = vgg.features_fn(variables, module)
  x, y = nchw_to_nhwc(z["input"]), nchw_to_nhwc(z["target"])
  total, terms = jax.jit(lambda a, b: losses.perceptual_loss(fn, a, b, cw, sw))(x, y)
  assert_close(terms, z[f"loss_{config}_terms"], atol=1e-6, rtol=1e-5, name=f"{config} terms")
  assert_close(total, z[f"loss_{config}"], atol=1e-6, rtol=1e-5, name=f"{config} total")


@pytest.mark.parametrize("stem", STEMS)
def test_perceptual_loss_skips_unused_blocks_and_has_gradient(fixtures_dir, stem):
  z = load_fixture(fixtures_dir, stem)
  module, variables = _model(fixtures_dir, stem)
  inner = vgg.features_fn(variables, module)
  asked = []

  def spy(images, num_blocks):
    asked.append(num_blocks)
    return inner(images, num_blocks)

  # A 16x16 crop keeps this fast; 16 -> 8 -> 4 -> 2 still reaches every block.
  x, y = nchw_to_nhwc(z["input"][:1, :, :16, :16]), nchw_to_nhwc(z["target"][:1, :, :16, :16])
  jax.eval_shape(lambda a, b: losses.perceptual_loss(spy, a, b, (0, 0, 0, 0), (0, 5, 5, 0)), x, y)
  losses.perceptual_loss(spy, x, y, (0, 0, 0, 0), (0, 0, 0, 0))
  assert asked == [3]  # block 4 skipped; all-zero weights run no VGG at all

  g = jax.jit(jax.grad(lambda a: losses.perceptual_loss(inner, a, y, (1,) * 4, (4,) * 4)[0]))(x)
  assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0


# ---------------------------------------------------------------------------------------------
# Converter

def _manifest(fixtures_dir: str, name: str) -> dict[str, tuple[tuple[int, ...], str]]:
  with open(os.path.join(fixtures_dir, "vgg16_manifest.json")) as f:
    return {k: (tuple(s), d) for k, (s, d) in json.load(f)[name].items()}


def _synthetic(manifest, seed=0):
  """Random conv tensors; the big classifier matrices as zero-stride views (no 400 MB alloc)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for k, (shape, _) in manifest.items():
    if k.startswith("classifier."):
      sd[k] = np.broadcast_to(np.float32(0), shape)
    else:
      sd[k] = rng.standard_normal(shape).astype(np.float32)
  return sd


def _check_params(variables, sd, prefix):
  params = variables["params"]
  expected = {f"conv_{i}" for _, ids in vgg.BLOCKS for i in ids}
  assert set(params) == expected
  for name, p in params.items():
    idx = name.split("_")[1]
    np.testing.assert_array_equal(p["kernel"], sd[f"{prefix}{idx}.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["bias"], sd[f"{prefix}{idx}.bias"])
    assert p["kernel"].dtype == np.float32


@pytest.mark.parametrize("name,prefix", [("torchvision_vgg16", "features."),
                                         ("torchvision_vgg16_features", "")])
def test_manifest_converts(fixtures_dir, name, prefix):
  sd = _synthetic(_manifest(fixtures_dir, name))
  variables, config = convert_state_dict("vgg16", sd)
  _check_params(variables, sd, prefix)
  assert config == {}
  # The converted variables are exactly what the module expects.
  ref = jax.eval_shape(vgg.VGG16Features().init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert (jax.tree_util.tree_structure(jax.eval_shape(vgg.init_variables, jax.random.PRNGKey(0)))
          == jax.tree_util.tree_structure(ref))
  assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(variables)):
    assert a.shape == b.shape


@pytest.mark.parametrize("stem", STEMS)
def test_fp16_pth_converts_and_loads(fixtures_dir, stem, tmp_path):
  path = os.path.join(fixtures_dir, stem + ".pth")
  import torch  # pylint: disable=import-outside-toplevel
  raw = torch.load(path, map_location="cpu", weights_only=True)
  half = {k: v.numpy() for k, v in raw.items()}  # raw float16 arrays straight into the converter
  variables, _ = convert_vgg16(half)
  _check_params(variables, load_torch_state_dict(path), "")

  dst = str(tmp_path / "vgg16")
  convert_file("vgg16", path, dst)
  module, restored = vgg.load(dst)
  z = load_fixture(fixtures_dir, stem)
  got = jax.jit(module.apply)(restored, nchw_to_nhwc(z["input"][:1]))[0]
  assert_close(got, nchw_to_nhwc(z["feat_input_0"][:1]), atol=1e-5, rtol=1e-5, name="restored")


def test_converter_errors_name_the_key(fixtures_dir):
  base = _synthetic(_manifest(fixtures_dir, "torchvision_vgg16"))

  bad = dict(base, **{"features.99.weight": np.zeros((3,), np.float32)})
  with pytest.raises(ConversionError, match=r"features\.99\.weight"):
    convert_vgg16(bad)

  bad = {k: v for k, v in base.items() if k != "features.12.bias"}
  with pytest.raises(ConversionError, match=r"features\.12\.bias"):
    convert_vgg16(bad)

  bad = dict(base, **{"features.5.weight": np.zeros((128, 64, 5, 5), np.float32)})
  with pytest.raises(ConversionError, match=r"features\.5\.weight.*\(128, 64, 5, 5\)"):
    convert_vgg16(bad)

  bad = dict(base, **{"features.26.weight": np.zeros((512, 256, 3, 3), np.float32)})
  with pytest.raises(ConversionError, match=r"features\.26\.weight"):  # skipped, but checked
    convert_vgg16(bad)

  bad = dict(base, **{"classifier.3.weight": np.broadcast_to(np.float32(0), (4096, 1000))})
  with pytest.raises(ConversionError, match=r"classifier\.3\.weight"):
    convert_vgg16(bad)

  bad = {k[len("features."):]: v for k, v in base.items() if k.startswith("features.")}
  bad["extra.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ConversionError, match=r"extra\.weight"):
    convert_vgg16(bad)
