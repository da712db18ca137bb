"""Parity of the MNIST CGN family with the authors' PyTorch outputs (../shared/fixtures).

Each fixture is converted through the real CLI path (.pth -> Orbax dir -> restore), then run in eval
and train mode. Fixtures are discovered by prefix, so new ones of a known family need no code change.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax import checkpoints
from cgn_jax.models.classifiers import MnistCNN
from cgn_jax.models.mnist_cgn import MASK_MIN, MASK_MAX, DiscConv, DiscLin, MnistCGN, tile_2x2
from converters import convert_file
from conftest import assert_close, fixture_stems, load_fixture, nchw_to_nhwc as t

MODELS = {"mnist_cgn": MnistCGN, "disc_lin": DiscLin, "disc_conv": DiscConv,
          "mnist_classifier": MnistCNN}


def _convert(fixtures_dir, stem, family, tmp_path, src=None):
  src = src or os.path.join(fixtures_dir, stem + ".pth")
  meta = convert_file(family, src, str(tmp_path / "ckpt"))
  variables = checkpoints.load_variables(str(tmp_path / "ckpt"), family=family)
  return MODELS[family](**meta["model_config"]), variables, meta["model_config"]


def _check_running_stats(new_stats: dict, z: dict, torch_to_flax: dict[str, str]) -> None:
  for torch_key, flax_path in torch_to_flax.items():
    node = new_stats
    for part in flax_path.split("/"):
      node = node[part]
    for tname, fname in (("running_mean", "mean"), ("running_var", "var"),
                         ("num_batches_tracked", "num_batches_tracked")):
      exp = z[f"train_after/{torch_key}.{tname}"]
      assert_close(node[fname], exp, atol=1e-5, rtol=1e-5, name=f"{torch_key}.{tname}")


def _cgn_check(model, variables, z):
  eval_inp = z["eval_inp"]
  assert_close(model.apply(variables, z["eval_labels"], method=lambda m, y: m.label_emb(y)),
               z["eval_label_emb"], atol=0, name="label_emb")
  for mode, train in (("eval", False), ("train", True)):
    inp = z[f"{mode}_inp"]
    (shape, text1, text2), new = model.apply(variables, inp, inp, inp, train,
                                             method=model.mechanisms, mutable=["batch_stats"])
    # The raw shape map reaches |x|~12 and its last instance norm divides by a small per-sample
    # std: torch itself lands 1.2e-5 away from a float64 evaluation of the same weights. So the
    # criterion is 1e-5 relative to the array's scale.
    assert_close(shape, t(z[f"{mode}_f_shape"]), atol=1e-5, scale_rtol=1e-5, name=f"{mode}_f_shape")
    assert_close(text1, t(z[f"{mode}_f_text1"]), atol=1e-5, name=f"{mode}_f_text1")
    assert_close(text2, t(z[f"{mode}_f_text2"]), atol=1e-5, name=f"{mode}_f_text2")
    if train:
      _check_running_stats(new["batch_stats"], z, {
          "f_shape.5": "f_shape/bn1", "f_shape.10": "f_shape/bn2",
          **{f"{m}.{i}": f"{m}/bn{j}" for m in ("f_text1", "f_text2")
             for i, j in ((4, 1), (8, 2), (11, 3))}})
    else:
      # The clamp inherits the raw map's error (same scale criterion as above).
      assert_close(jnp.clip(shape, MASK_MIN, MASK_MAX), t(z["eval_mask_clamped"]), atol=1e-5,
                   scale_rtol=1e-5 * float(np.abs(z["eval_f_shape"]).max()), name="mask_clamped")
  assert_close(tile_2x2(t(z["eval_patch2image_in"])), t(z["eval_patch2image_out"]), atol=0,
               name="patch2image")
  # The full forward's random crops: applying the stored torch offsets to our tiling reproduces them.
  _, text1, text2 = model.apply(variables, eval_inp, eval_inp, eval_inp, False, method=model.mechanisms)
  for name, tex in (("fg", text1), ("bg", text2)):
    rows, cols = z[f"eval_full_crop_row_{name}"], z[f"eval_full_crop_col_{name}"]
    assert rows.max() <= 32 and cols.max() <= 32
    tiled = np.asarray(tile_2x2(tex))
    crops = np.stack([tiled[b, r:r + 32, c:c + 32] for b, (r, c) in enumerate(zip(rows, cols))])
    assert crops.shape == tex.shape


def _disc_check(model, variables, z):
  imgs, labels = t(z["images"]), z["labels"]
  assert_close(model.apply(variables, imgs, labels, train=False), z["eval_out"], atol=1e-5, name="eval_out")
  if "train_out" in z:
    out, new = model.apply(variables, imgs, labels, train=True, mutable=["batch_stats"])
    assert_close(out, z["train_out"], atol=1e-5, name="train_out")
    _check_running_stats(new["batch_stats"], z, {f"model.{3 * i + 1}": f"bn{i}" for i in range(4)})


def _cnn_check(model, variables, z):
  imgs = t(z["images"])
  assert_close(model.apply(variables, imgs, train=False), z["eval_out"], atol=1e-5, name="eval_out")
  out, new = model.apply(variables, imgs, train=True, mutable=["batch_stats"])
  assert_close(out, z["train_out"], atol=1e-5, name="train_out")
  _check_running_stats(new["batch_stats"], z, {"model.0": "bn_in"})


CASES = ([(s, "mnist_cgn", _cgn_check) for s in fixture_stems("mnist_cgn_")]
         + [(s, "disc_lin", _disc_check) for s in fixture_stems("mnist_disc_lin")]
         + [(s, "disc_conv", _disc_check) for s in fixture_stems("mnist_disc_conv")]
         + [(s, "mnist_classifier", _cnn_check) for s in fixture_stems("mnist_classifier_cnn")])


@pytest.mark.parametrize("stem,family,check", CASES, ids=[c[0] for c in CASES])
def test_fixture_parity(fixtures_dir, tmp_path, stem, family, check):
  z = load_fixture(fixtures_dir, stem)
  model, variables, cfg = _convert(fixtures_dir, stem, family, tmp_path)
  for key in ("n_classes", "latent_sz", "ngf", "img_sz", "ndf", "num_classes"):
    if key in z and key in cfg:
      assert cfg[key] == int(z[key]), f"converter read {key}={cfg[key]}, fixture says {int(z[key])}"
  check(model, variables, z)


PRETRAINED = ["colored_MNIST", "double_colored_MNIST", "wildlife_MNIST"]


@pytest.mark.parametrize("name", PRETRAINED)
def test_real_checkpoint_reproduces_fixture(data_dir, fixtures_dir, tmp_path, name):
  """The authors' published checkpoints (shared/data/pretrained) give the fixture's outputs."""
  src = os.path.join(data_dir, "pretrained", "mnist_cgn", f"{name}.pth")
  z = load_fixture(fixtures_dir, f"mnist_cgn_{name}")
  model, variables, _ = _convert(fixtures_dir, None, "mnist_cgn", tmp_path, src=src)
  _cgn_check(model, variables, z)


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


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 5, 7, 3)])
def test_subpixel_upsample_conv_equals_upsample_then_conv(shape):
  """The fast generation path computes the same map as nn.Upsample + Conv2d (to float rounding)."""
  from cgn_jax.models.layers import upsample2_conv3x3
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 4))
  np.testing.assert_allclose(np.asarray(upsample2_conv3x3(x, k, subpixel=True)),
                             np.asarray(upsample2_conv3x3(x, k, subpixel=False)), atol=1e-5, rtol=1e-5)


def test_subpixel_cgn_matches_fixture(fixtures_dir, tmp_path):
  z = load_fixture(fixtures_dir, "mnist_cgn_colored_MNIST")
  model, variables, _ = _convert(fixtures_dir, "mnist_cgn_colored_MNIST", "mnist_cgn", tmp_path)
  model = model.clone(subpixel=True)
  inp = z["eval_inp"]
  shape, text1, text2 = model.apply(variables, inp, inp, inp, False, method=model.mechanisms)
  assert_close(shape, t(z["eval_f_shape"]), atol=1e-5, scale_rtol=1e-5, name="f_shape")
  assert_close(text1, t(z["eval_f_text1"]), atol=1e-5, name="f_text1")
  assert_close(text2, t(z["eval_f_text2"]), atol=1e-5, name="f_text2")
