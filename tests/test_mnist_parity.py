"""Parity of the MNIST CGN family with the authors' PyTorch outputs (../shared/fixtures).

Each fixture is converted through the real CLI path (.pth -> Orbax dir -> restore), then every
array the fixture holds is compared (``parity.check_fixture``): eval and train outputs, the input
vector, the tiling, and the BatchNorm buffers after the train call (``train_after/*``). Fixtures are
discovered by prefix, so new ones of a known family need no code change; an array the rules below
do not know fails the test, naming it. Tolerances: ``parity.TOLERANCES``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax import checkpoints
from cgn_jax.models.classifiers import MnistCNN
from cgn_jax.models.mnist_cgn import MASK_MIN, MASK_MAX, DiscConv, DiscLin, MnistCGN, tile_2x2
from converters import convert_file
from conftest import fixture_stems, load_fixture, nchw_to_nhwc as t
from parity import Fixture, ParityError, Rule, check_fixture, compare

MODELS = {"mnist_cgn": MnistCGN, "disc_lin": DiscLin, "disc_conv": DiscConv,
          "mnist_classifier": MnistCNN}

# Keys that are inputs, recorded random draws or configuration, per family (re.fullmatch).
INPUTS = {
    "mnist_cgn": [r"n_classes|latent_sz|ngf|img_sz", r"(eval|train)_seed", r"(eval|train)_(labels|u)",
                  r"eval_patch2image_in",
                  # The full forward's random crop offsets (torch's RNG): inputs of the crop check.
                  r"eval_full_crop_(row|col)_(fg|bg)"],
    "disc_lin": [r"n_classes|ndf|seed|weights_float16", r"images|labels"],
    "disc_conv": [r"n_classes|ndf|seed", r"images|labels"],
    "mnist_classifier": [r"num_classes|seed", r"images"],
}

# torch BatchNorm module -> Flax module path, per family (the train_after/<module>.<buffer> keys).
BN_MODULES = {
    "mnist_cgn": {"f_shape.5": "f_shape/bn1", "f_shape.10": "f_shape/bn2",
                  **{f"{m}.{i}": f"{m}/bn{j}" for m in ("f_text1", "f_text2")
                     for i, j in ((4, 1), (8, 2), (11, 3))}},
    "disc_lin": {},
    "disc_conv": {f"model.{3 * i + 1}": f"bn{i}" for i in range(4)},
    "mnist_classifier": {"model.0": "bn_in"},
}


def _nchw(x) -> np.ndarray:
  x = np.asarray(x)
  return np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def _convert(fixtures_dir, stem, family, tmp_path, src=None):
  src = src or os.path.join(fixtures_dir, stem + ".pth")
  meta = convert_file(family, src, str(tmp_path / "ckpt"))
  variables = checkpoints.load_variables(str(tmp_path / "ckpt"), family=family)
  return MODELS[family](**meta["model_config"]), variables, meta["model_config"]


def _bn_rules(family: str, new_stats) -> list[Rule]:
  """train_after/<torch module>.<buffer> -> the Flax batch_stats after the same train call(s)."""
  mapping = BN_MODULES[family]

  def port(m):
    module, buffer = m.group(1), m.group(2)
    if module not in mapping:
      raise ParityError(f"train_after/{module}.{buffer}: no Flax BatchNorm of {family} is mapped to "
                        f"torch module '{module}' (known: {sorted(mapping)})")
    node = new_stats()
    for part in mapping[module].split("/"):
      node = node[part]
    return node[{"running_mean": "mean", "running_var": "var"}.get(buffer, buffer)]

  return [Rule(r"train_after/(.+)\.(running_mean|running_var)", "mnist/bn_running", port),
          Rule(r"train_after/(.+)\.(num_batches_tracked)", "mnist/bn_count", port)]


def _cgn_rules(family, model, variables, z: Fixture) -> list[Rule]:
  @functools.cache
  def inp(mode):
    """The port's input vector cat(u, label_emb(y)) from the stored draw and labels."""
    return np.asarray(model.apply(variables, z[f"{mode}_u"], z[f"{mode}_labels"], method=model.get_inp))

  @functools.cache
  def mechanisms(mode):
    x = z[f"{mode}_inp"] if f"{mode}_inp" in z else inp(mode)
    (shape, text1, text2), new = model.apply(variables, x, x, x, mode == "train",
                                             method=model.mechanisms, mutable=["batch_stats"])
    return {"f_shape": _nchw(shape), "f_text1": _nchw(text1), "f_text2": _nchw(text2),
            "batch_stats": new["batch_stats"]}

  emb = lambda m: model.apply(variables, z[f"{m[1]}_labels"], method=lambda mdl, y: mdl.label_emb(y))
  shape_scale = lambda m: float(np.abs(mechanisms("eval")["f_shape"]).max())
  return [
      Rule(r"(eval|train)_label_emb", "mnist_cgn/copy", emb),
      Rule(r"(eval|train)_inp", "mnist_cgn/copy", lambda m: inp(m[1])),
      Rule(r"(eval|train)_f_shape", "mnist_cgn/f_shape", lambda m: mechanisms(m[1])["f_shape"]),
      Rule(r"(eval|train)_(f_text[12])", "mnist_cgn/f_text", lambda m: mechanisms(m[1])[m[2]]),
      Rule(r"eval_mask_clamped", "mnist_cgn/mask_clamped",
           lambda m: np.clip(mechanisms("eval")["f_shape"], MASK_MIN, MASK_MAX), scale=shape_scale),
      Rule(r"eval_patch2image_out", "mnist_cgn/copy",
           lambda m: _nchw(tile_2x2(t(z["eval_patch2image_in"])))),
      *_bn_rules(family, lambda: mechanisms("train")["batch_stats"]),
  ]


def _disc_rules(family, model, variables, z: Fixture) -> list[Rule]:
  fwd = lambda train: model.apply(variables, t(z["images"]), z["labels"], train=train,
                                  mutable=["batch_stats"])
  train = functools.cache(lambda: fwd(True))
  rules = [Rule(r"eval_out", f"{family}/out", lambda m: fwd(False)[0])]
  if family == "disc_conv":  # DiscLin's train mode draws dropout masks: nothing to compare
    rules += [Rule(r"train_out", f"{family}/out", lambda m: train()[0]),
              *_bn_rules(family, lambda: train()[1]["batch_stats"])]
  return rules


def _cnn_rules(family, model, variables, z: Fixture) -> list[Rule]:
  fwd = lambda train: model.apply(variables, t(z["images"]), train=train, mutable=["batch_stats"])
  train = functools.cache(lambda: fwd(True))
  return [Rule(r"eval_out", f"{family}/out", lambda m: fwd(False)[0]),
          Rule(r"train_out", f"{family}/out", lambda m: train()[0]),
          *_bn_rules(family, lambda: train()[1]["batch_stats"])]


def _check_crops(model, variables, z: Fixture) -> None:
  """The recorded crop offsets are windows of the 2x2 tiling (0..32), and cropping our tiled
  textures with them gives full-size textures (what torch's shuffler returned)."""
  keys = [k for k in ("fg", "bg") if f"eval_full_crop_row_{k}" in z and f"eval_full_crop_col_{k}" in z]
  if not keys:
    return
  x = z["eval_inp"] if "eval_inp" in z else model.apply(
      variables, z["eval_u"], z["eval_labels"], method=model.get_inp)
  _, text1, text2 = model.apply(variables, x, x, x, False, method=model.mechanisms)
  for name in keys:
    tex = {"fg": text1, "bg": text2}[name]
    rows, cols = z[f"eval_full_crop_row_{name}"], z[f"eval_full_crop_col_{name}"]
    assert rows.min() >= 0 and cols.min() >= 0 and rows.max() <= 32 and cols.max() <= 32
    tiled = np.asarray(tile_2x2(tex))
    crops = np.stack([tiled[b, r:r + 32, c:c + 32] for b, (r, c) in enumerate(zip(rows, cols))])
    assert crops.shape == tex.shape


RULES = {"mnist_cgn": _cgn_rules, "disc_lin": _disc_rules,
         "disc_conv": _disc_rules, "mnist_classifier": _cnn_rules}


def _check(family, model, variables, z, stem, only=None) -> dict[str, float]:
  """Compares every array of fixture ``z`` (a dict, possibly a subset of the file); returns errors."""
  z = Fixture(z, stem)
  errors = check_fixture(z, RULES[family](family, model, variables, z), INPUTS[family], stem, only)
  if family == "mnist_cgn" and only is None:
    _check_crops(model, variables, z)
  return errors


CASES = ([(s, "mnist_cgn") for s in fixture_stems("mnist_cgn_")]
         + [(s, "disc_lin") for s in fixture_stems("mnist_disc_lin")]
         + [(s, "disc_conv") for s in fixture_stems("mnist_disc_conv")]
         + [(s, "mnist_classifier") for s in fixture_stems("mnist_classifier_cnn")])


@pytest.mark.parametrize("stem,family", CASES, ids=[c[0] for c in CASES])
def test_fixture_parity(fixtures_dir, tmp_path, stem, family):
  z = load_fixture(fixtures_dir, stem)
  model, variables, cfg = _convert(fixtures_dir, stem, family, tmp_path)
  for key in ("n_classes", "latent_sz", "ngf", "img_sz", "ndf", "num_classes"):
    if key in z and key in cfg:
      assert cfg[key] == int(z[key]), f"converter read {key}={cfg[key]}, fixture says {int(z[key])}"
  _check(family, model, variables, z, stem)


def test_reduced_fixture_is_checked_on_the_arrays_it_holds(fixtures_dir, tmp_path):
  """A fixture file with a subset of the shared arrays: exactly those outputs are compared."""
  stem = "mnist_cgn_wildlife_MNIST"
  full = load_fixture(fixtures_dir, stem)
  model, variables, _ = _convert(fixtures_dir, stem, "mnist_cgn", tmp_path)
  # No train arrays, no eval_inp (the port builds it from eval_u), no f_text2 / mask / tiling.
  keep = ("eval_labels", "eval_u", "eval_label_emb", "eval_f_shape", "eval_f_text1", "ngf")
  np.savez(tmp_path / f"{stem}.npz", **{k: full[k] for k in keep})
  errors = _check("mnist_cgn", model, variables, load_fixture(str(tmp_path), stem), stem)
  assert set(errors) == {"eval_label_emb", "eval_f_shape", "eval_f_text1"}

  # An output whose input the file lacks fails naming the input, not with a KeyError.
  lacking = {k: full[k] for k in ("eval_labels", "eval_f_shape")}
  with pytest.raises(ParityError, match="lacks 'eval_u'"):
    _check("mnist_cgn", model, variables, lacking, stem)

  # An array no rule knows fails before anything is computed, naming it.
  with pytest.raises(ParityError, match="eval_f_text3"):
    _check("mnist_cgn", model, variables, {**{k: full[k] for k in keep},
                                           "eval_f_text3": full["eval_f_text1"]}, stem)


def test_unknown_batchnorm_buffer_and_wrong_value_fail_naming_the_key(fixtures_dir, tmp_path):
  stem = "mnist_disc_conv"
  full = load_fixture(fixtures_dir, stem)
  model, variables, _ = _convert(fixtures_dir, stem, "disc_conv", tmp_path)
  extra = {**full, "train_after/model.99.running_mean": full["train_after/model.1.running_mean"]}
  with pytest.raises(ParityError, match=r"model\.99"):
    _check("disc_conv", model, variables, extra, stem)
  wrong = {**full, "eval_out": full["eval_out"] + 1e-3}
  with pytest.raises(ParityError, match=r"eval_out: max \|port - ref\| 0\.001"):
    _check("disc_conv", model, variables, wrong, stem)


PRETRAINED = ["colored_MNIST", "double_colored_MNIST", "wildlife_MNIST"]


@pytest.mark.parametrize("name", PRETRAINED)
def test_real_checkpoint_reproduces_fixture(data_dir, fixtures_dir, tmp_path, name):
  """The authors' published checkpoints (shared/data/pretrained) give the fixture's outputs."""
  src = os.path.join(data_dir, "pretrained", "mnist_cgn", f"{name}.pth")
  z = load_fixture(fixtures_dir, f"mnist_cgn_{name}")
  model, variables, _ = _convert(fixtures_dir, None, "mnist_cgn", tmp_path, src=src)
  _check("mnist_cgn", model, variables, z, f"mnist_cgn_{name}")


@pytest.mark.parametrize("seed", range(8))
def test_shuffler_is_a_crop_of_the_tiling(seed):
  """For any key, every output is one of the 33x33 windows of the 2x2 tiling."""
  from cgn_jax.models.mnist_cgn import shuffle_crop
  x = jax.random.normal(jax.random.key(100 + seed), (6, 32, 32, 3))
  out, offsets = shuffle_crop(jax.random.key(seed), x)
  tiled = np.asarray(tile_2x2(x))
  assert out.shape == x.shape
  for b, (r, c) in enumerate(np.asarray(offsets)):
    assert 0 <= r <= 32 and 0 <= c <= 32
    np.testing.assert_array_equal(np.asarray(out[b]), tiled[b, r:r + 32, c:c + 32])
    # a crop of the tiling is a circular shift of the original
    np.testing.assert_array_equal(np.asarray(out[b]), np.roll(np.asarray(x[b]), (-r, -c), (0, 1)))


def test_offsets_cover_both_ends():
  from cgn_jax.models.mnist_cgn import shuffle_crop
  _, offsets = shuffle_crop(jax.random.key(0), jnp.zeros((4000, 32, 32, 1)))
  offsets = np.asarray(offsets)
  assert offsets.min() == 0 and offsets.max() == 32  # 0..32 inclusive, like torch's 33 windows


def test_counterfactual_mode_permutes_labels():
  model = MnistCGN(ngf=4)
  from cgn_jax.models.mnist_cgn import init_variables
  v = init_variables(model, jax.random.key(0))
  ys = jnp.arange(10) % 10
  out = model.apply(v, ys, jax.random.key(3), counterfactual=True)
  for k in ("y_fg", "y_bg"):
    assert sorted(np.asarray(out[k]).tolist()) == sorted(np.asarray(ys).tolist())
  assert not np.array_equal(np.asarray(out["y_fg"]), np.asarray(ys))
  assert out["mask"].shape == (10, 32, 32, 1)
  assert float(out["mask"].min()) >= np.float32(MASK_MIN) and float(out["mask"].max()) <= np.float32(MASK_MAX)
  plain = model.apply(v, ys, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(plain["y_fg"]), np.asarray(ys))


def _upsample_conv_sumabs(x: np.ndarray, k: np.ndarray) -> np.ndarray:
  """Σ|terms| of every output of conv3x3(pad 1)(nearest_upsample_x2(x)), in float64."""
  up = np.abs(np.repeat(np.repeat(np.asarray(x, np.float64), 2, 1), 2, 2))
  h, w = up.shape[1:3]
  pad = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = np.abs(np.asarray(k, np.float64))
  return sum(np.einsum("nhwc,co->nhwo", pad[:, i:i + h, j:j + w], k[i, j])
             for i in range(3) for j in range(3))


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 5, 7, 3)])
def test_subpixel_upsample_conv_equals_upsample_then_conv(shape):
  """The fast generation path computes the same map as nn.Upsample + Conv2d (to float rounding:
  two associations of the same float32 sums, bounded by parity.TOLERANCES["self/subpixel_conv"])."""
  from cgn_jax.models.layers import upsample2_conv3x3
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 4))
  compare(upsample2_conv3x3(x, k, subpixel=True), upsample2_conv3x3(x, k, subpixel=False),
          "self/subpixel_conv", f"subpixel vs faithful {shape}", sumabs=_upsample_conv_sumabs(x, k))


@pytest.mark.parametrize("stem", fixture_stems("mnist_cgn_"))
def test_subpixel_cgn_matches_fixture(fixtures_dir, tmp_path, stem):
  """The sub-pixel generator meets the same parity tolerances on the eval mechanism outputs."""
  z = load_fixture(fixtures_dir, stem)
  model, variables, _ = _convert(fixtures_dir, stem, "mnist_cgn", tmp_path)
  _check("mnist_cgn", model.clone(subpixel=True), variables, z, stem,
         only=r"eval_(f_shape|f_text[12]|mask_clamped)")
