"""The GAN baseline of the MNIST table: its capacity claim, its transposed convs against torch, a
tiny training run that resumes exactly, its samples read by the classifier, and the table and
curve drivers' output code on made-up results."""

from __future__ import annotations

import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax import checkpoints
from cgn_jax.data import storage
from cgn_jax.jobs import generate_mnist, train_classifier, train_gan_mnist
from cgn_jax.models import mnist_gan
from cgn_jax.models.mnist_cgn import MnistCGN
from configs import mnist_classifier, mnist_gan as gan_config, mnist_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _n_params(module, *args) -> int:
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_generator_has_the_capacity_of_the_cgn():
  """The config's GAN generator is within 1 % of the CGN generator's parameters (the docstring's
  655,860 vs 659,992); the count is the closed form of [Re]'s GenConv layers, and their ngf 32 is
  26 % bigger."""
  ys = jnp.zeros((2,), jnp.int32)
  cgn = _n_params(MnistCGN(), ys, jax.random.key(0))
  ngf = gan_config.get_config().model.ngf
  gan = _n_params(mnist_gan.MnistGANGenerator(ngf=ngf), ys, jnp.zeros((2, 32)))
  # embedding 10x10; ConvT 42->8n->4n->2n->3 (4x4, no bias); BN scale+bias after the first three.
  closed_form = lambda n: (100 + 16 * (42 * 8 * n + 8 * n * 4 * n + 4 * n * 2 * n + 2 * n * 3)
                           + 28 * n)
  assert gan == closed_form(ngf)
  assert abs(gan / cgn - 1) < 0.01, (gan, cgn)
  assert (gan, cgn) == (655860, 659992)
  assert closed_form(32) / cgn > 1.2


@pytest.mark.parametrize("size,stride,padding,k", [(1, 1, 0, 4), (5, 2, 1, 4), (6, 1, 1, 3)])
def test_conv_transpose_matches_torch(size, stride, padding, k):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, size, size)).astype(np.float32)
  w = rng.standard_normal((5, 3, k, k)).astype(np.float32)
  ref = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(w), stride=stride,
                                             padding=padding).numpy()
  out = mnist_gan.conv_transpose_torch(jnp.asarray(x.transpose(0, 2, 3, 1)),
                                       jnp.asarray(w.transpose(2, 3, 0, 1)), stride, padding)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=2e-5)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
  """The ``:tiny`` GAN, 6 steps on real Double-colored images, checkpoints at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("gan"))
  c = gan_config.get_config("tiny")
  with c.unlocked():
    c.data_dir = data_dir
  state = train_gan_mnist.train_and_evaluate(c, workdir)
  return c, workdir, jax.tree.map(np.asarray, state)


def test_tiny_training_checkpoints_exports_and_resumes_exactly(tiny_run, tmp_path):
  c, workdir, state = tiny_run
  assert int(state.step) == c.train.num_steps
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert os.listdir(os.path.join(workdir, "samples"))
  exported = checkpoints.load_variables(os.path.join(workdir, "generator"), mnist_gan.FAMILY)
  jax.tree.map(np.testing.assert_array_equal, exported["params"], state.g_params)
  # A copy stopped after step 3 (its newer checkpoint gone) resumes to the same final state.
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed_dir, ignore=shutil.ignore_patterns("generator", "samples"))
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))
  resumed = train_gan_mnist.train_and_evaluate(c, resumed_dir)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), state)


def test_samples_are_a_dataset_the_classifier_reads(tiny_run, tmp_path):
  """The generation job writes the GAN's samples as ``<dataset>_gan``; the classifier's reader
  takes them, labelled by the label stream of ``default_rng(seed)``, ``no_cfs`` draws each."""
  c, workdir, _ = tiny_run
  gen = mnist_generate.get_config("tiny")
  with gen.unlocked():
    gen.dataset, gen.checkpoint = c.dataset, os.path.join(workdir, "generator")
  out = generate_mnist.generate(gen, str(tmp_path))
  assert os.path.basename(out) == f"{c.dataset}_gan"
  clf = mnist_classifier.get_config("tiny")
  with clf.unlocked():
    clf.dataset, clf.data_dir, clf.dataset_limit = c.dataset, c.data_dir, c.dataset_limit
    clf.real_dataset_dir = os.path.join(workdir, "data", c.dataset)
    clf.train_on, clf.cf_dataset_dir = "counterfactual", out
  (x, y, enc), _ = train_classifier.load_data(clf, str(tmp_path))
  assert x.shape == (gen.dataset_size, 32, 32, 3) and enc == "uint8_unit"
  first = np.random.default_rng(gen.seed).integers(0, 10, gen.batch_size)
  np.testing.assert_array_equal(y[:gen.no_cfs * gen.batch_size], np.tile(first, gen.no_cfs))
  _, labels = storage.read_split(out, "train")
  np.testing.assert_array_equal(labels["texture"], labels["label"])
  # the stored images are the exported generator's (eval mode) for that first batch
  model, variables = mnist_gan.load(gen.checkpoint)
  fn = jax.jit(mnist_gan.make_generate_fn(model, gen.no_cfs))
  images = np.asarray(fn(variables, jnp.asarray(first, jnp.int32), jax.random.fold_in(
      jax.random.key(gen.seed), 0))[0]).reshape(-1, 32, 32, 3)
  stored = x[:len(images)].astype(np.int32)
  assert np.abs(stored - storage.encode_uint8(images).astype(np.int32)).max() <= 1


def _script(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_curve_driver_table_and_plot_on_fake_results(tmp_path):
  pytest.importorskip("matplotlib")
  curve = _script("cf_count_curve")
  points = {"wildlife_MNIST": {"10000": {"test_acc": 51.25, "epochs": 10, "note": "measured"},
                               "100000": {"test_acc": 84.16, "epochs": 10,
                                          "note": "reused: README"}}}
  text = curve.table(points, ["wildlife_MNIST"])
  assert "| wildlife_MNIST | 10,000 | 51.25 | 10 | 47.85 | measured |" in text
  assert "| wildlife_MNIST | 1,000,000 | — | — | 84.55 | — |" in text  # [Re]'s point alone
  png = curve.plot(points, ["wildlife_MNIST"], str(tmp_path / "curve.png"))
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(png) as im:
    assert im.size == (640, 420)
    assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # drawn
  assert os.path.getsize(png) < 300_000


def test_table_driver_rows_beside_the_paper():
  table = _script("reproduce_mnist_table")
  args = type("Args", (), dict(variants=["colored_MNIST"], real_epochs=1, real_max_images=0,
                               gan_steps=3000, gan_dataset_size=10000, gan_no_cfs=10, gan_epochs=10,
                               dataset_size=100000, no_cfs=10, epochs=10, reuse="old.json"))
  rows = {"colored_MNIST": {"real": 31.5, "gan": 28.25, "counterfactual": 92.2,
                            "reused": ["counterfactual"]}}
  text = table.table(rows, args, ("real", "gan", "counterfactual"))
  assert "| Original | 31.50 | 35.9 | 37.6 |" in text
  assert "| GAN | 28.25 | 40.7 | 32.5 |" in text
  assert "| CGN | 92.20* | 95.1 | 92.3 |" in text and "old.json" in text
