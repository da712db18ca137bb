"""The ImageNet counterfactual generation job on its tiny config (random 32-px CGN, 4 simulated
devices).

Every run uses batch size 4, so the CGN forward compiles once for the whole file (the job caches the
jitted function per process). The :tiny config's random weights are also exported once as a CGN
checkpoint (family ``imagenet_cgn``, as the training job exports it): the other runs load it, and
since it holds the same weights, their images must equal the random-init run's, index by index,
whatever the batch composition or the resume history.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from cgn_jax import checkpoints
from cgn_jax.jobs import generate_imagenet as job
from cgn_jax.models import imagenet_cgn
from configs import imagenet_generate

PAD = 2  # save_image_grid's border


def _config(variant: str = "tiny", **overrides):
  c = imagenet_generate.get_config(variant)
  for k, v in overrides.items():
    c[k] = v
  return c


def _labels(run_dir: str, name: str = "labels.csv") -> tuple[list[str], list[list[str]]]:
  with open(os.path.join(run_dir, name), newline="") as f:
    lines = list(csv.reader(f))
  return lines[0], lines[1:]


def _pixels(run_dir: str, i: int, run_name: str = "tiny") -> np.ndarray:
  with Image.open(os.path.join(run_dir, "ims", f"{run_name}_{i:07d}_x_gen.jpg")) as im:
    assert im.format == "JPEG" and im.mode == "RGB"
    return np.asarray(im, np.int16)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The :tiny config as shipped: random weights, 10 images in batches of 4 (last one padded)."""
  c = _config()
  return c, job.run(c, str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  work = str(tmp_path_factory.mktemp("export"))
  cfg, _, load = job._resolve_model(_config(), work)  # pylint: disable=protected-access
  path = os.path.join(work, "cgn")
  checkpoints.save_variables(path, load(), {"family": "imagenet_cgn", "model_config": cfg.to_dict()})
  return path


def test_tiny_writes_n_data_images_and_labels(tiny_run):
  c, res = tiny_run
  run_dir = res["run_dir"]
  assert (res["written"], res["skipped"]) == (c.n_data, 0)
  header, rows = _labels(run_dir)
  assert header == ["idx", "im_name", "shape_cls", "texture_cls", "bg_cls"]
  assert [int(r[0]) for r in rows] == list(range(c.n_data))
  assert [r[1] for r in rows] == [f"tiny_{i:07d}" for i in range(c.n_data)]
  assert sorted(os.listdir(os.path.join(run_dir, "ims"))) == [
      f"tiny_{i:07d}_x_gen.jpg" for i in range(c.n_data)]
  classes = np.asarray([r[2:] for r in rows], np.int64)
  assert classes.min() >= 0 and classes.max() < 1000
  assert len(np.unique(classes)) > 10  # 30 independent uniform draws
  for i in range(c.n_data):
    assert _pixels(run_dir, i).shape == (32, 32, 3)
  with open(os.path.join(run_dir, "manifest.json")) as f:
    m = json.load(f)
  assert (m["n_data"], m["mode"], m["truncation"], m["seed"], m["complete"]) == (
      c.n_data, "random", c.truncation, c.seed, True)
  assert m["model_config"] == imagenet_cgn.config_from_fields(c.model).to_dict()


def test_resume_regenerates_exactly_the_missing_indices(tiny_run, checkpoint, tmp_path):
  _, tiny_res = tiny_run
  work = str(tmp_path)
  first = job.run(_config(checkpoint=checkpoint, allow_random_init=False, n_data=6,
                          save_npy=True), work)
  run_dir, victim = first["run_dir"], 3
  assert first["written"] == 6
  ims = os.path.join(run_dir, "ims")
  raw_before = np.load(os.path.join(ims, f"tiny_{victim:07d}_x_gen.npy"))
  pixels_before = _pixels(run_dir, victim)
  row_before = _labels(run_dir)[1][victim]
  os.remove(os.path.join(ims, f"tiny_{victim:07d}_x_gen.jpg"))
  labels = os.path.join(run_dir, "labels.csv")
  with open(labels, "rb") as f:
    data = f.read()
  with open(labels, "wb") as f:  # killed mid-row: the last row (image 5) is torn
    f.write(data[:-6])

  second = job.run(_config(checkpoint=checkpoint, allow_random_init=False, n_data=10,
                           save_npy=True), work)
  assert (second["written"], second["skipped"]) == (6, 4)  # 3 and 5, then 6..9
  _, rows = _labels(run_dir)
  assert sorted(int(r[0]) for r in rows) == list(range(10))  # no duplicates, no gaps
  assert sorted(n for n in os.listdir(ims) if n.endswith(".jpg")) == [
      f"tiny_{i:07d}_x_gen.jpg" for i in range(10)]
  assert not [n for n in os.listdir(ims) if n.startswith(".")]  # no temp files left
  by_index = {int(r[0]): r for r in rows}
  assert by_index[victim] == row_before
  np.testing.assert_allclose(np.load(os.path.join(ims, f"tiny_{victim:07d}_x_gen.npy")),
                             raw_before, atol=1e-6, rtol=0)
  assert np.abs(_pixels(run_dir, victim) - pixels_before).max() <= 1

  # The same weights, seed and mode as the :tiny run (random init, batches 0-3, 4-7, 8-9): the same
  # labels and images, although here the batches were 0-3, 4-5, then 3, 5, 6, 7 and 8-9.
  _, tiny_rows = _labels(tiny_res["run_dir"])
  assert [r[2:] for r in tiny_rows] == [by_index[i][2:] for i in range(10)]
  for i in range(10):
    assert np.abs(_pixels(run_dir, i) - _pixels(tiny_res["run_dir"], i)).max() <= 1, i

  with pytest.raises(FileExistsError, match="seed"):  # a resume never mixes two datasets
    job.run(_config(checkpoint=checkpoint, allow_random_init=False, n_data=10, seed=1), work)


def test_fixed_classes_with_the_checkpoint_architecture(checkpoint, tmp_path):
  # The default config's model fields describe the 256-px CGN: the checkpoint's own must win.
  c = _config("", checkpoint=checkpoint, mode="fixed_classes", classes=(425, 3, 147), n_data=4,
              batch_size=4, run_name="fixed", progress_bar=False)
  res = job.run(c, str(tmp_path))
  _, rows = _labels(res["run_dir"])
  assert [r[1:] for r in rows] == [[f"fixed_{i:07d}", "425", "3", "147"] for i in range(4)]
  for i in range(4):
    assert _pixels(res["run_dir"], i, "fixed").shape == (32, 32, 3)


def test_interpolation_sheet(checkpoint, tmp_path):
  interp, n_rows = "text", 2  # rows: x_gen, then the interpolated mechanism's output (foreground)
  u = np.clip(np.random.default_rng(0).standard_normal((1, 128)), -2, 2).astype(np.float32)
  np.save(tmp_path / "u.npy", u)
  c = _config(checkpoint=checkpoint, allow_random_init=False, interp=interp, midpoints=2,
              interp_cls=147, n_data=1, run_name="sheet", u_fixed=str(tmp_path / "u.npy"))
  res = job.run(c, str(tmp_path))
  assert res["written"] == 1
  cols, size = c.midpoints + 2, 32
  with Image.open(os.path.join(res["run_dir"], "sheets", f"sheet_0000000_{interp}_interp.png")) as im:
    assert im.size == (cols * (size + PAD) + PAD, n_rows * (size + PAD) + PAD)
    grid = np.asarray(im, np.int16)
  tile = lambda r, k: grid[PAD + r * (size + PAD):][:size, PAD + k * (size + PAD):][:, :size]
  # The foreground row changes from the first to the last column: all columns share the noise, so
  # without the interpolation they would be identical (random weights respond only weakly to the
  # class, hence no larger threshold).
  assert np.abs(tile(n_rows - 1, 0) - tile(n_rows - 1, cols - 1)).max() > 0


def test_empty_checkpoint_without_random_init_names_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.checkpoint"):
    job.run(_config(allow_random_init=False), str(tmp_path))


def test_draws_depend_only_on_seed_and_index():
  """Classes and noise of index i are the same in any batch, order or company (mode best_classes:
  each mechanism from its own list of the authors)."""
  pools = job.class_pools("best_classes", (0, 0, 0), 1000)
  index = np.arange(100)
  z, cls, target = job.draw_inputs(7, index, pools, 0.5, 128, 1000)
  sub = index[::-3]  # another order and size (a different chunk padding)
  z2, cls2, target2 = job.draw_inputs(7, sub, pools, 0.5, 128, 1000)
  np.testing.assert_array_equal(z2, z[sub])
  np.testing.assert_array_equal(cls2, cls[sub])
  np.testing.assert_array_equal(target2, target[sub])
  for m, allowed in enumerate((job.MASKS, job.FOREGROUND, job.BACKGROUNDS)):
    assert set(cls[:, m]) <= set(allowed) and len(set(cls[:, m])) > 20
  assert np.abs(z).max() <= 1.0 and z.std() > 0.2  # truncnorm(-2, 2) * 0.5
  assert not np.array_equal(job.draw_inputs(8, index, pools, 0.5, 128, 1000)[1], cls)


def test_pixels_follow_torchvision_save_image():
  """``normalize=True`` (per-image min-max) and ``value_range=(-1, 1)``, written out with torch
  ops in torchvision's order (make_grid's norm_ip, then save_image's mul/add/clamp/to(uint8))."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).uniform(-1.3, 1.1, (3, 5, 4, 3)).astype(np.float32)
  x[2] = 0.25  # a flat image: torchvision divides by max(range, 1e-5)

  def reference(img, low=None, high=None):
    t = torch.tensor(img).permute(2, 0, 1).clone()
    low = float(t.min()) if low is None else low
    high = float(t.max()) if high is None else high
    t.clamp_(min=low, max=high).sub_(low).div_(max(high - low, 1e-5))
    return t.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()

  np.testing.assert_array_equal(np.asarray(job.to_uint8(x, True)), [reference(i) for i in x])
  np.testing.assert_array_equal(np.asarray(job.to_uint8(x, False)),
                                [reference(i, -1.0, 1.0) for i in x])


def test_merge_label_shards(tmp_path):
  shards = {0: [0, 2, 4], 1: [3, 1]}
  for p, idx in shards.items():
    with open(tmp_path / f"labels_{p:03d}.csv", "w") as f:
      f.write(job.HEADER + "\n" + "".join(f"{i},r_{i:07d},{i},{i + 1},{i + 2}\n" for i in idx))
  job.merge_label_shards(str(tmp_path))
  header, rows = _labels(str(tmp_path))
  assert header == job.HEADER.split(",")
  assert rows == [[str(i), f"r_{i:07d}", str(i), str(i + 1), str(i + 2)] for i in range(5)]
