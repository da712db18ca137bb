"""Every model family's ``load``: an authors' file and its converted directory give the same module
and variables, the file is converted once (a second load restores the cache), and restoring needs
neither the converters nor torch.

The ImageNet CGN's loader is tested in test_imagenet_cgn_converter.py, next to its synthetic
``cgn.pth``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cgn_jax import checkpoints
from cgn_jax.models import biggan, classifiers, imagenet_cgn, loading, mnist_cgn, u2net, vgg
from converters import registry

# case -> (loader, family, fixture stem, loader kwargs for the .pth)
CASES = {
    "mnist_cgn": (mnist_cgn.load, "mnist_cgn", "mnist_cgn_colored_MNIST", {}),
    "disc_lin": (mnist_cgn.load, "disc_lin", "mnist_disc_lin", {"family": "disc_lin"}),
    "disc_conv": (mnist_cgn.load, "disc_conv", "mnist_disc_conv", {"family": "disc_conv"}),
    "mnist_classifier": (classifiers.load, "mnist_classifier", "mnist_classifier_cnn", {}),
    "vgg16": (vgg.load, "vgg16", "vgg16_features", {}),
    "biggan": (biggan.load, "biggan", "biggan_deep_w16", {}),
    "u2net": (u2net.load, "u2net", "u2netp", {}),
}


def _fixture(fixtures_dir: str, stem: str) -> str:
  path = os.path.join(fixtures_dir, stem + ".pth")
  if not os.path.isfile(path):
    pytest.skip(f"fixture {path} missing")
  return path


def _assert_same(a, b) -> None:
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


def _no_conversion(*args, **kwargs):
  raise AssertionError(f"converted again: {args}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_file_and_converted_dir_agree_and_the_cache_is_reused(case, fixtures_dir, tmp_path,
                                                               monkeypatch):
  pytest.importorskip("torch", reason="reading .pth needs the convert extra")
  load, family, stem, kwargs = CASES[case]
  src, cache = _fixture(fixtures_dir, stem), str(tmp_path / "converted")
  module, from_file = load(src, cache, **kwargs)
  assert os.listdir(cache) == [f"{family}_{stem}"]

  # The directory knows its family and architecture: no arguments needed.
  dir_module, from_dir = load(os.path.join(cache, f"{family}_{stem}"))
  assert type(dir_module) is type(module) and dir_module == module
  _assert_same(from_dir, from_file)

  monkeypatch.setattr(registry, "convert_file", _no_conversion)
  _, again = load(src, cache, **kwargs)
  _assert_same(again, from_file)


def test_module_kwargs_reach_the_module(fixtures_dir, tmp_path):
  pytest.importorskip("torch")
  src = _fixture(fixtures_dir, "mnist_cgn_colored_MNIST")
  module, _ = mnist_cgn.load(src, str(tmp_path), subpixel=True)
  assert module.subpixel
  model, _ = u2net.load(_fixture(fixtures_dir, "u2netp"), str(tmp_path), dtype=np.float16)
  assert (model.variant, model.dtype) == ("u2netp", np.float16)


def test_default_cache_dir_follows_the_environment(fixtures_dir, tmp_path, monkeypatch):
  pytest.importorskip("torch")
  monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
  assert loading.default_cache_dir() == str(tmp_path / "cache")
  mnist_cgn.load(_fixture(fixtures_dir, "mnist_disc_conv"), family="disc_conv")
  assert os.listdir(tmp_path / "cache") == ["disc_conv_mnist_disc_conv"]
  monkeypatch.delenv(loading.CACHE_ENV)
  assert loading.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "cgn_jax",
                                                     "converted")


def test_missing_checkpoint_is_one_line_with_the_fix(tmp_path):
  with pytest.raises(checkpoints.CheckpointError) as info:
    biggan.load(str(tmp_path / "nope.pth"), str(tmp_path))
  msg = str(info.value)
  assert "not found" in msg and "python -m converters biggan" in msg and "\n" not in msg


def test_wrong_family_directory_names_both(fixtures_dir, tmp_path):
  pytest.importorskip("torch")
  classifiers.load(_fixture(fixtures_dir, "mnist_classifier_cnn"), str(tmp_path))
  cnn_dir = str(tmp_path / "mnist_classifier_mnist_classifier_cnn")
  with pytest.raises(checkpoints.CheckpointError, match="holds a 'mnist_classifier' checkpoint, "
                                                        "expected 'mnist_cgn'"):
    mnist_cgn.load(cnn_dir)
  with pytest.raises(ValueError, match="family 'vgg16' is not in cgn_jax.models.mnist_cgn"):
    mnist_cgn.load(cnn_dir, family="vgg16")


def test_another_file_of_the_same_name_is_not_served_from_the_cache(fixtures_dir, tmp_path):
  torch = pytest.importorskip("torch")
  src = _fixture(fixtures_dir, "mnist_disc_conv")
  cache = str(tmp_path / "cache")
  mnist_cgn.load(src, cache, family="disc_conv")
  other = tmp_path / "run2" / "mnist_disc_conv.pth"
  other.parent.mkdir()
  torch.save(torch.load(src, weights_only=True), other)
  with pytest.raises(checkpoints.CheckpointError, match="delete it or pass another cache_dir"):
    mnist_cgn.load(str(other), cache, family="disc_conv")


def test_restoring_needs_neither_converters_nor_torch(fixtures_dir, tmp_path):
  pytest.importorskip("torch")
  mnist_cgn.load(_fixture(fixtures_dir, "mnist_disc_lin"), str(tmp_path), family="disc_lin")
  code = ("import sys; from cgn_jax.models import mnist_cgn; "
          f"m, _ = mnist_cgn.load({str(tmp_path / 'disc_lin_mnist_disc_lin')!r}); "
          "bad = sorted({n.split('.')[0] for n in sys.modules} & {'converters', 'torch'}); "
          "assert not bad, bad; print(type(m).__name__)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "DiscLin"


def test_empty_vgg_checkpoint_warns_and_uses_random_features(caplog):
  with caplog.at_level("WARNING"):
    fn = vgg.load_features_fn("", None, jax.random.key(0))
  assert callable(fn) and "RANDOM VGG16 features" in caplog.text


def test_fixed_noise_from_npy_and_pth_agree(tmp_path):
  torch = pytest.importorskip("torch")
  u = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
  np.save(tmp_path / "u.npy", u)
  torch.save(torch.from_numpy(u), tmp_path / "u.pth")
  np.testing.assert_array_equal(imagenet_cgn.load_fixed_noise(str(tmp_path / "u.npy"), 128), u)
  np.testing.assert_array_equal(imagenet_cgn.load_fixed_noise(str(tmp_path / "u.pth"), 128), u)
  with pytest.raises(ValueError, match="dimension 128, the model expects 64"):
    imagenet_cgn.load_fixed_noise(str(tmp_path / "u.npy"), 64)
  with pytest.raises(FileNotFoundError, match="config.u_fixed"):
    imagenet_cgn.load_fixed_noise(str(tmp_path / "none.npy"), 128)


def _model_fields(**overrides):
  import ml_collections  # pylint: disable=import-outside-toplevel
  fields = dict(output_dim=32, channel_width=4, layers=((True, 16, 8), (False, 8, 4), (True, 4, 2),
                                                        (True, 2, 1)),
                attention_layer_position=1, u2net_variant="u2netp")
  return ml_collections.ConfigDict({**fields, **overrides})


def test_config_from_fields_and_random_variables():
  cfg = imagenet_cgn.config_from_fields(_model_fields())
  assert (cfg.biggan.output_dim, cfg.biggan.channel_width, cfg.u2net_variant) == (32, 4, "u2netp")
  published = imagenet_cgn.config_from_fields(_model_fields(output_dim=256, layers=()))
  assert published.biggan.layers == biggan.PUBLISHED_LAYERS[256]
  with pytest.raises(ValueError, match="output_dim=48 has no published layout"):
    imagenet_cgn.config_from_fields(_model_fields(output_dim=48, layers=()))
  a, b = imagenet_cgn.random_variables(cfg, 3), imagenet_cgn.random_variables(cfg, 3)
  _assert_same(a, b)
  # The authors' initialisation: every generator starts from the same BigGAN.
  for name in imagenet_cgn.MECHANISMS:
    _assert_same(a["params"][name], a["params"]["biggan_GT"])
  _assert_same(a["params"]["biggan_GT"], biggan.init_variables(cfg.biggan, 3)["params"])


def test_unconverted_directory_names_the_family(tmp_path):
  (tmp_path / "biggan-deep-256").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match="python -m converters biggan SRC DST"):
    biggan.load(str(tmp_path / "biggan-deep-256"))
