"""VGG16 feature extractor, its converter and the perceptual loss against the ``vgg16_features*`` fixtures.

The references were computed with the authors' ``PerceptualLoss`` on a random torchvision VGG16
(README §6). Every array a fixture holds is compared (``parity.check_fixture``): the hooked
features, the grams, and every stored loss config (``loss_<name>``, ``loss_<name>_terms``, with the
weights read from ``loss_<name>_{cont,style}_wgts``); an array no rule knows fails, naming it.
Tolerances (from the README's torch-vs-torch noise): ``parity.TOLERANCES``.
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
from parity import Fixture, ParityError, Rule, check_fixture, compare
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
      names = sorted(m.group(1) for k in z.files if (m := re.fullmatch(r"loss_(.+)_style_wgts", k))
                     and f"loss_{m.group(1)}_cont_wgts" in z.files)
    cases.extend((stem, n) for n in names)
  return cases


@functools.lru_cache(maxsize=None)
def _model(fixtures_dir: str, stem: str):
  variables, config = convert_vgg16(load_torch_state_dict(os.path.join(fixtures_dir, stem + ".pth")))
  module = vgg.VGG16Features(**config)
  return module, variables


@functools.lru_cache(maxsize=None)
def _apply_fn(fixtures_dir: str, stem: str):
  module, _ = _model(fixtures_dir, stem)
  return jax.jit(module.apply)


def _features_of(fixtures_dir: str, stem: str, images_nchw: np.ndarray) -> list[np.ndarray]:
  _, variables = _model(fixtures_dir, stem)
  return [np.asarray(f) for f in _apply_fn(fixtures_dir, stem)(variables, nchw_to_nhwc(images_nchw))]


@functools.lru_cache(maxsize=None)
def _features(fixtures_dir: str, stem: str, which: str) -> list[np.ndarray]:
  return _features_of(fixtures_dir, stem, load_fixture(fixtures_dir, stem)[which])


INPUTS = [r"seed", r"input|target", r"loss_.+_(cont|style)_wgts"]


def _weights(z, config):
  return ([float(w) for w in z[f"loss_{config}_cont_wgts"]],
          [float(w) for w in z[f"loss_{config}_style_wgts"]])


def _check(fixtures_dir: str, stem: str, arrays) -> dict[str, float]:
  """Compares every array of ``arrays`` (the fixture or a subset of it) with the port."""
  z = Fixture(arrays, stem)
  feats = functools.cache(lambda which: _features_of(fixtures_dir, stem, z[which]))

  def hooked(m) -> np.ndarray:  # NHWC features of hooked layer k of `input` / `target`
    which, k = m[1], int(m[2])
    if k >= len(vgg.HOOKED_LAYER_IDS):
      raise ParityError(f"{m.string}: the extractor hooks only {len(vgg.HOOKED_LAYER_IDS)} layers")
    return feats(which)[k]

  def feature(m):  # NCHW; some layers are stored for the first sample(s) only
    return hooked(m)[:z[m.string].shape[0]].transpose(0, 3, 1, 2)

  def gram(m):
    return losses.gram_matrix(jnp.asarray(hooked(m)))

  @functools.cache
  def loss(config):
    cw, sw = _weights(z, config)
    fx = [jnp.asarray(f) for f in feats("input")]
    fy = [jnp.asarray(f) for f in feats("target")]
    return losses.perceptual_loss_from_features(fx, fy, cw, sw)

  rules = [Rule(r"hooked_layer_ids", "vgg/config", lambda m: np.asarray(vgg.HOOKED_LAYER_IDS)),
           Rule(r"feat_(input|target)_(\d+)", "vgg/features", feature),
           Rule(r"gram_(input|target)_(\d+)", "vgg/gram", gram),
           Rule(r"loss_(.+)_terms", "vgg/loss", lambda m: loss(m[1])[1]),
           Rule(r"loss_(.+)", "vgg/loss", lambda m: loss(m[1])[0])]
  return check_fixture(z, rules, INPUTS, stem)


@pytest.mark.parametrize("stem", STEMS)
def test_fixture_parity(fixtures_dir, stem):
  _check(fixtures_dir, stem, load_fixture(fixtures_dir, stem))


def test_reduced_fixture_is_checked_on_the_arrays_it_holds(fixtures_dir, tmp_path):
  stem = STEMS[0]
  full = load_fixture(fixtures_dir, stem)
  if "loss_mixed_terms" not in full:
    pytest.skip(f"{stem} lacks the arrays this test subsets")
  # Features of `input` only, no grams, one loss config (its total only).
  keep = ("input", "target", "feat_input_1", "loss_mixed", "loss_mixed_cont_wgts",
          "loss_mixed_style_wgts")
  np.savez(tmp_path / f"{stem}.npz", **{k: full[k] for k in keep})
  assert set(_check(fixtures_dir, stem, load_fixture(str(tmp_path), stem))) == {"feat_input_1",
                                                                                "loss_mixed"}
  subset = {k: full[k] for k in keep}
  with pytest.raises(ParityError, match="feat_input_7"):
    _check(fixtures_dir, stem, {**subset, "feat_input_7": full["feat_input_1"]})
  with pytest.raises(ParityError, match="lacks 'loss_other_cont_wgts'"):
    _check(fixtures_dir, stem, {**subset, "loss_other": full["loss_mixed"]})
  with pytest.raises(ParityError, match="texture_map"):
    _check(fixtures_dir, stem, {**subset, "texture_map": full["feat_input_1"]})


@pytest.mark.parametrize("stem,config", _loss_cases(), ids=lambda v: v)
def test_perceptual_loss(fixtures_dir, stem, config):
  """Port-only properties of each stored config (its values are compared by test_fixture_parity):
  static zero weights contribute exactly 0, and traced weights take the generic path and agree."""
  z = load_fixture(fixtures_dir, stem)
  cw, sw = _weights(z, config)
  fx = [jnp.asarray(f) for f in _features(fixtures_dir, stem, "input")]
  fy = [jnp.asarray(f) for f in _features(fixtures_dir, stem, "target")]
  total, terms = losses.perceptual_loss_from_features(fx, fy, cw, sw)
  # Static zero weights contribute exactly 0 (skipped, not multiplied).
  for i, w in enumerate(cw + sw):
    if w == 0.0:
      assert float(terms[i]) == 0.0

  # Traced weights (e.g. an array from a config) take the generic path and agree.
  traced = jax.jit(lambda a, b, c, s: losses.perceptual_loss_from_features(a, b, list(c), list(s)))(
      fx, fy, jnp.asarray(cw, jnp.float32), jnp.asarray(sw, jnp.float32))
  for key, static, dynamic in ((f"loss_{config}", total, traced[0]),
                               (f"loss_{config}_terms", terms, traced[1])):
    if key in z:
      compare(dynamic, z[key], "vgg/loss", f"{stem}:{key} traced")
    compare(dynamic, static, "vgg/loss", f"{stem}:{key} traced vs static")


@pytest.mark.parametrize("stem", STEMS)
def test_perceptual_loss_end_to_end(fixtures_dir, stem):
  """images -> VGG -> loss under jit, for the stored config with the most non-zero weights."""
  z = load_fixture(fixtures_dir, stem)
  configs = [c for s, c in _loss_cases() if s == stem]
  if not configs:
    pytest.skip(f"{stem} stores no loss config")
  config = max(configs, key=lambda c: sum(w != 0 for w in sum(_weights(z, c), [])))
  cw, sw = _weights(z, config)
  module, variables = _model(fixtures_dir, stem)
  fn = vgg.features_fn(variables, module)
  x, y = nchw_to_nhwc(z["input"]), nchw_to_nhwc(z["target"])
  total, terms = jax.jit(lambda a, b: losses.perceptual_loss(fn, a, b, cw, sw))(x, y)
  got = {f"loss_{config}": total, f"loss_{config}_terms": terms}
  assert any(k in z for k in got), f"{stem} stores neither loss_{config} nor its terms"
  for key in got:
    if key in z:
      compare(got[key], z[key], "vgg/loss", f"{stem}:{key} end to end")


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
  assert asked == [3, 3]  # target, then input; block 4 skipped; all-zero weights run no VGG

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
