"""Generation metrics (Inception Score, FID, mask statistics) and the ``evaluate_generation`` job.

The formulas are checked on closed-form cases; the job end to end on tiny image folders with the
random-weight ``inception_v3_fid`` fixture (the scores mean nothing, but the run, the JSON and the
FID-against-saved-statistics round trip are real). Every run uses batch 4 over the 4 simulated
devices, so the Inception network compiles once for the file. The ``cgn`` source runs with a
stand-in CGN forward: the tiny ImageNet CGN's own forward takes ~2 min to compile on a CPU (BigGAN
x3 + U2-Net), so the stand-in's masks are a known function of the drawn noise and classes, which
checks the sampling (seed, index, truncation, ``random_same``), the padding of the last batch and
the mask path; the real CGN forward is ``cgn_jax.data.cgn_sampling.forward_fn``, tested with the
generation job.
"""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from cgn_jax import errors
from cgn_jax.data import cgn_sampling
from cgn_jax.evaluation import generation_metrics as gm
from cgn_jax.jobs import evaluate_generation as job
from cgn_jax.models import imagenet_cgn
from configs import generation_eval, imagenet
from configs.common import apply_overrides


# --- Inception Score ---------------------------------------------------------------------------

def test_is_of_uniform_predictions_is_one():
  mean, std, scores = gm.inception_score(np.full((12, 7), 1 / 7), splits=3)
  assert scores == pytest.approx([1.0] * 3, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_of_confident_balanced_predictions_is_the_class_count():
  k = 5
  probs = np.eye(k)[np.arange(4 * k) % k]  # each split of 2k rows sees every class twice
  mean, std, scores = gm.inception_score(probs, splits=2)
  assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_of_a_mixture_by_hand():
  # p(y) = (3/4, 1/4); KL = log(4/3) and (1/2) log(2/3) + (1/2) log 2 = (1/2) log(4/3).
  mean, _, _ = gm.inception_score(np.asarray([[1.0, 0.0], [0.5, 0.5]]), splits=1)
  assert mean == pytest.approx((4 / 3) ** 0.75, rel=1e-12)


def test_is_splits_are_contiguous_and_use_every_image():
  # N = 5, 2 splits: rows [0, 2) (two classes: score 2) and [2, 5) (three classes: score 3). A
  # split of N // S rows each (sbarratt's) would score 2 and 2.
  probs = np.eye(3)[[0, 1, 0, 1, 2]]
  mean, std, scores = gm.inception_score(probs, splits=2)
  assert scores == pytest.approx([2.0, 3.0]) and (mean, std) == pytest.approx((2.5, 0.5))
  with pytest.raises(errors.InputError, match="5 images cannot use 6 splits"):
    gm.inception_score(probs, splits=6)


def test_softmax_is_stable():
  p = gm.softmax(np.asarray([[1000.0, 1000.0, -np.inf], [0.0, np.log(3.0), 0.0]]))
  np.testing.assert_allclose(p, [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2]], rtol=1e-12)


# --- FID ---------------------------------------------------------------------------------------

def _psd(d: int, seed: int) -> np.ndarray:
  a = np.random.default_rng(seed).standard_normal((d, 2 * d))
  return a @ a.T / (2 * d)


def test_fid_of_identical_statistics_is_zero():
  mu, sigma = np.arange(16.0), _psd(16, 0)
  assert abs(gm.frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_fid_of_diagonal_covariances_in_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
  expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert gm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-12)


def test_fid_equals_pytorch_fids_sqrtm_formula():
  rng = np.random.default_rng(2)
  mu1, mu2, s1, s2 = rng.standard_normal(24), rng.standard_normal(24), _psd(24, 3), _psd(24, 4)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert gm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("n", [5, 40])  # fewer images than features (N x N path), and more
def test_fid_from_features_in_closed_form(n):
  # Against sigma2 = c I: tr((S1 c)^(1/2)) = sqrt(c) * (sum of the singular values of the centred
  # features / sqrt(n - 1)), exact even where S1 is singular (n <= d), where a D x D eigen route
  # loses ~sqrt(eps) per rounding-level eigenvalue (1e-8 relative at n = 5, d = 24).
  rng = np.random.default_rng(n)
  feats, mu2, c = rng.standard_normal((n, 24)) + 0.3, rng.standard_normal(24), 1.7
  a = (feats - feats.mean(0)) / np.sqrt(n - 1)
  expect = (np.sum((feats.mean(0) - mu2) ** 2) + np.sum(a * a) + 24 * c
            - 2 * np.sqrt(c) * np.linalg.svd(a, compute_uv=False).sum())
  got = gm.frechet_distance_features(feats, mu2, c * np.eye(24))
  assert got == pytest.approx(expect, rel=1e-12)
  with pytest.raises(errors.InputError, match="at least 2 images"):
    gm.frechet_distance_features(feats[:1], mu2, np.eye(24))


def test_statistics_files_round_trip(tmp_path):
  mu, sigma = np.arange(3.0), _psd(3, 6)
  path = gm.save_stats(str(tmp_path / "s.npz"), mu, sigma, network="fid", num_images=7)
  got_mu, got_sigma, meta = gm.load_stats(path)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  assert meta == {"network": "fid", "num_images": 7} and os.listdir(tmp_path) == ["s.npz"]
  np.savez(tmp_path / "other.npz", x=np.zeros(2))
  with pytest.raises(errors.InputError, match="holds x, not FID statistics"):
    gm.load_stats(str(tmp_path / "other.npz"))


# --- masks -------------------------------------------------------------------------------------

def test_mask_statistics_of_hand_made_masks():
  masks = np.zeros((4, 4, 4, 1))
  masks[1] = 1.0                 # full: mean 1
  masks[2, :, :2] = 1.0          # half: 0.5
  masks[3, :1, :2] = 1.0         # 2 of 16 pixels: 0.125, above 0.1
  masks[0, 0, 0] = 0.5           # 0.5 of 16 pixels: 0.03125, near empty
  means = masks.reshape(4, -1).mean(axis=1)
  got = gm.mask_statistics(means, empty_below=0.1, full_above=0.9)
  m = np.asarray([1 / 32, 1.0, 0.5, 0.125])
  assert got == pytest.approx({"mean": m.mean(), "std": np.sqrt(np.mean((m - m.mean()) ** 2)),
                               "frac_empty": 0.25, "frac_full": 0.25, "empty_below": 0.1,
                               "full_above": 0.9, "num_images": 4})


def test_dataset_images_follow_the_labels_and_read_re_cgn_masks(tmp_path):
  ims = tmp_path / "run" / "ims"
  ims.mkdir(parents=True)
  for i in (2, 0, 1):
    Image.new("RGB", (8, 8)).save(ims / f"run_{i:07d}_x_gen.jpg")
  (tmp_path / "run" / "labels.csv").write_text(
      "idx,im_name,shape_cls,texture_cls,bg_cls\n" +
      "".join(f"{i},run_{i:07d},1,2,3\n" for i in (1, 0, 2)))
  (tmp_path / "run" / "mean_masks.txt").write_text("0.25\n0.5\n0.75")
  files, masks = job.dataset_images(str(tmp_path / "run"))
  assert [os.path.basename(f) for f in files] == [f"run_{i:07d}_x_gen.jpg" for i in range(3)]
  np.testing.assert_array_equal(masks, [0.25, 0.5, 0.75])
  with pytest.raises(errors.InputError, match=r"did you mean .*run\?"):
    job.dataset_images(str(tmp_path))


# --- the job -----------------------------------------------------------------------------------

def _images(folder, sizes, seed: int) -> str:
  """Small random images of several sizes and formats (all resized to 299 by the job)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i, (h, w) in enumerate(sizes):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert("L" if i == 1 else "RGB")
    img.save(os.path.join(folder, f"{i}.{'jpg' if i == 2 else 'png'}"))
  return str(folder)


def _config(**overrides):
  return apply_overrides(generation_eval.get_config("tiny"), **overrides)


@pytest.fixture(scope="module")
def inception_pth(fixtures_dir) -> str:
  return os.path.join(fixtures_dir, "inception_v3_fid.pth")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, inception_pth):
  """3 images (the last batch padded) against a 4-image reference whose statistics are saved."""
  root = tmp_path_factory.mktemp("folders")
  gen = _images(root / "gen", [(40, 32), (32, 32), (64, 48)], seed=0)
  ref = _images(root / "ref", [(32, 40), (48, 48), (36, 30), (30, 60)], seed=1)
  stats = str(root / "ref_stats.npz")
  workdir = str(root / "work")
  config = _config(path=gen, inception_checkpoint=inception_pth, fid_reference=ref,
                   save_reference_stats=stats)
  return config, workdir, job.run(config, workdir), stats


def test_folder_run_writes_the_metrics(folder_run, capsys):
  config, workdir, res, stats = folder_run
  with open(os.path.join(workdir, job.METRICS_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(res))
  assert not [n for n in os.listdir(workdir) if n.startswith(".")]  # no temporary file left
  s = res["inception_score"]
  assert (s["splits"], s["num_images"], s["network"]) == (2, 3, "fid")
  assert "bilinear" in s["preprocessing"] and "1008 classes" in s["logits"]
  assert 1.0 <= s["mean"] <= 3.0 and s["std"] >= 0  # IS lies in [1, images per split]
  assert s["mean"] == pytest.approx(np.mean(s["split_scores"]))
  assert res["mask"] is None and res["source"]["kind"] == "folder"
  assert res["fid"] > 0 and res["fid_reference"]["num_images"] == 4
  mu, sigma, meta = gm.load_stats(stats)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and meta["network"] == "fid"


def test_fid_against_saved_statistics_is_the_same(folder_run, tmp_path):
  config, _, res, stats = folder_run
  again = job.run(apply_overrides(config, fid_reference=stats, save_reference_stats=""),
                  str(tmp_path))
  assert again["fid"] == pytest.approx(res["fid"], rel=1e-9)
  assert again["inception_score"]["split_scores"] == res["inception_score"]["split_scores"]
  torchvision_stats = str(tmp_path / "tv.npz")
  gm.save_stats(torchvision_stats, *gm.load_stats(stats)[:2], network="torchvision")
  with pytest.raises(errors.ConfigError,
                     match="network 'torchvision'.*--config.network=torchvision"):
    job.run(apply_overrides(config, fid_reference=torchvision_stats, save_reference_stats=""),
            str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")  # refused before any work


def test_cgn_source_with_a_stand_in_forward(folder_run, tmp_path, monkeypatch):
  config, _, _, _ = folder_run
  cfg = imagenet_cgn.config_from_fields(imagenet.get_config("tiny").model)
  size = cfg.biggan.output_dim
  checkpoint = tmp_path / "cgn.pth"
  checkpoint.write_bytes(b"stand-in")
  loads = []

  def fake_load(path, cache_dir=None, dtype=None):
    loads.append(path)
    return types.SimpleNamespace(config=cfg), {"params": {}}

  def fake_forward_fn(cfg_, dtype):
    def fwd(variables, z, y_shape, y_text, y_bg, sel):
      same = jnp.all((y_shape == y_text) & (y_text == y_bg), axis=1)
      m = 0.25 * jax.nn.sigmoid(z[:, 0]) + 0.5 * same  # [B]: a known function of the draws
      ramp = jnp.linspace(-1, 1, size)[None, :, None, None]
      return {"x_gen": jnp.tanh(z[:, None, None, :3]) * ramp * jnp.ones((1, 1, size, 1)),
              "mask": jnp.broadcast_to(m[:, None, None, None], (z.shape[0], size, size, 1))}
    return jax.jit(fwd)

  monkeypatch.setattr(imagenet_cgn, "load", fake_load)
  monkeypatch.setattr(cgn_sampling, "forward_fn", fake_forward_fn)
  c = apply_overrides(config, source="cgn", path=str(checkpoint), num_images=4, fid_reference="",
                      save_reference_stats="", truncation=0.7, seed=3)
  res = job.run(c, str(tmp_path / "work"))
  assert loads == [str(checkpoint)]
  pools = cgn_sampling.class_pools("random", (0, 0, 0), cfg.biggan.num_classes)
  z, _, _ = cgn_sampling.draw_inputs(3, np.arange(4), pools, 0.7, cfg.biggan.z_dim,
                                     cfg.biggan.num_classes)
  expect = 0.25 / (1 + np.exp(-z[:, 0].astype(np.float64))) + 0.5  # random_same: all classes equal
  assert res["mask"] == pytest.approx(gm.mask_statistics(expect, 0.1, 0.9), abs=1e-6)
  assert res["inception_score"]["num_images"] == 4 and res["fid"] is None
  src = res["source"]
  assert (src["kind"], src["truncation"], src["seed"]) == ("cgn", 0.7, 3)
  assert src["mode"] == "random_same"
  assert "CGN x_gen" in res["inception_score"]["preprocessing"]


def _one_line(e: BaseException) -> str:
  line = errors.one_line(e, "--workdir w", "--workdir")
  assert line is not None and "\n" not in line, repr(e)
  return line


@pytest.mark.parametrize("overrides, expect", [
    ({"path": "{missing}"}, "does not exist; give an existing folder"),
    ({"path": "{empty}"}, "holds no image"),
    ({"network": "inceptoin"}, "is not one of fid, torchvision"),
    ({"source": "folders"}, "did you mean --config.source=folder?"),
    ({"inception_checkpoint": ""}, "pt_inception-2015-12-05"),
    ({"source": "cgn", "num_images": -1}, "--config.num_images=50000"),
    ({"fid_reference": "{missing}.txt"}, "neither a folder of images nor a statistics .npz"),
    ({"transform_input": True}, "--config.network=torchvision"),
])
def test_bad_inputs_end_in_one_line_naming_the_fix(tmp_path, overrides, expect):
  (tmp_path / "empty").mkdir()
  (tmp_path / "one").mkdir()
  Image.new("RGB", (4, 4)).save(tmp_path / "one" / "a.png")
  paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty")}
  fields = {"path": str(tmp_path / "one"), "inception_checkpoint": str(tmp_path / "one" / "a.png")}
  fields.update({k: v.format(**paths) if isinstance(v, str) else v for k, v in overrides.items()})
  with pytest.raises(Exception) as info:
    job.run(_config(**fields), str(tmp_path / "work"))
  assert expect in _one_line(info.value)
  assert not os.path.exists(tmp_path / "work")
