"""The ``explain_ensemble`` job end to end on ``:tiny``: a random width-8 ensemble exported as the
training job exports it, three PNGs written here, and every output checked against the model's
own ``apply`` (occlusion drops, integrated-gradients completeness, predictions, the crop).
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from cgn_jax import checkpoints
from cgn_jax.data import imagenet
from cgn_jax.data.storage import DataError
from cgn_jax.errors import ConfigError
from cgn_jax.jobs import explain_ensemble as job
from cgn_jax.models import resnet
from configs import imagenet_heatmaps
from configs.common import apply_overrides
from test_heatmaps import _random_variables

# (sub-folder, file, height, width): a WNID folder (tench = class 0), an index folder, none. Every
# shorter side is the tiny Resize(36), so the crop is a plain slice of the file's pixels.
IMAGES = (("n01440764", "a.png", 36, 36), ("5", "b.png", 44, 36), ("", "c.png", 36, 40))
FOLDER_CLASS = (0, 5, None)
IG_STEPS = 64  # the tiny 4 leave ~15% quadrature error; 64 cost no more compile


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("ensemble_heatmaps")
  rng = np.random.default_rng(0)
  pixels = []
  for folder, name, h, w in IMAGES:
    os.makedirs(root / "images" / folder, exist_ok=True)
    px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(px).save(root / "images" / folder / name)
    pixels.append(px)
  c = imagenet_heatmaps.get_config("tiny")
  model = resnet.ensemble_from_fields(c.model)
  variables = _random_variables(
      model, np.zeros((1, c.data.image_size, c.data.image_size, 3), np.float32), seed=1)
  train_dir = str(root / "train")  # what train_classifier_imagenet leaves: <workdir>/ensemble
  checkpoints.save_variables(os.path.join(train_dir, resnet.EXPORT_DIR), variables, {
      "family": "invariant_ensemble", "model_config": {"blocks": [1, 1, 1, 1], "width": 8,
                                                        "num_classes": 1000}})
  c = apply_overrides(c, **{"checkpoint": train_dir, "images": str(root / "images"),
                            "data.eval_dir": os.path.join(data_dir, "eval"),
                            "ig.steps": IG_STEPS})
  workdir = str(root / "work")
  res = job.run(c, workdir)
  arrays = dict(np.load(os.path.join(workdir, job.ARRAYS)))
  return c, model, variables, pixels, workdir, res, arrays


def _crop(px, size=32):
  """CenterCrop(32) of an image whose shorter side is already 36 (torchvision's offsets)."""
  h, w = px.shape[:2]
  top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
  return px[top:top + size, left:left + size]


def _log_probs(model, variables, x):
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return {h: np.asarray(jax.nn.log_softmax(np.asarray(o, np.float64), -1)) for h, o in out.items()}


def test_inputs_are_the_evaluation_crop_and_targets_come_from_the_folders(tiny):
  c, _, _, pixels, workdir, res, arrays = tiny
  mean, std = np.array(imagenet.IMAGENET_MEAN), np.array(imagenet.IMAGENET_STD)
  order = sorted(range(len(IMAGES)), key=lambda i: os.path.join(*IMAGES[i][:2]))
  assert [r["path"] for r in res["images"]] == [
      os.path.join(c.images, *[p for p in IMAGES[i][:2] if p]) for i in order]
  for row, i in enumerate(order):
    want = (_crop(pixels[i]) / 255.0 - mean) / std
    np.testing.assert_allclose(arrays["images"][row], want, atol=1e-5)
    assert res["images"][row]["folder_class"] == FOLDER_CLASS[i]
    for h in c.heads:
      r = res["images"][row]["heads"][h]
      if FOLDER_CLASS[i] is None:
        assert r["target_from"] == "predicted" and r["target"] == r["predicted"]
      else:
        assert r["target_from"] == "folder" and r["target"] == FOLDER_CLASS[i]
  assert res["images"][order.index(0)]["heads"]["shape_preds"]["target_name"] == "tench"
  with open(os.path.join(workdir, job.RESULTS)) as f:
    assert json.load(f) == json.loads(json.dumps(res))


def test_predictions_scores_and_heatmaps_match_the_model_itself(tiny):
  """Occlusion: patch 16 = stride 16 on 32 px, so each pixel's heat is the one drop of the
  quadrant it lies in. Integrated gradients: their sum is score(x) - score(mean image)."""
  c, model, variables, _, _, res, arrays = tiny
  x = arrays["images"]
  n, s = len(x), c.occlusion.patch
  occluded = []
  for y0 in (0, s):
    for x0 in (0, s):
      o = x.copy()
      o[:, y0:y0 + s, x0:x0 + s] = 0.0  # baseline "mean": zero after Normalize
      occluded.append(o)
  lp = _log_probs(model, variables, np.concatenate([x, np.zeros_like(x), *occluded]))
  rows = np.arange(n)
  for h in c.heads:
    full, base, quads = lp[h][:n], lp[h][n:2 * n], lp[h][2 * n:].reshape(4, n, -1)
    assert arrays[f"{h}/predicted"].tolist() == full.argmax(-1).tolist()
    assert [r["heads"][h]["predicted"] for r in res["images"]] == full.argmax(-1).tolist()
    t = arrays[f"{h}/target"]
    np.testing.assert_allclose([r["heads"][h]["score"] for r in res["images"]], full[rows, t],
                               rtol=1e-5)
    heat = arrays[f"{h}/occlusion"]
    for q, (y0, x0) in enumerate(((0, 0), (0, s), (s, 0), (s, s))):
      drop = full[rows, t] - quads[q][rows, t]
      block = heat[:, y0:y0 + s, x0:x0 + s].reshape(n, -1)
      np.testing.assert_allclose(block, np.repeat(drop[:, None], s * s, 1), rtol=1e-3, atol=2e-5)
    gap = full[rows, t] - base[rows, t]
    assert np.abs(gap).max() > 0.1, gap  # something to attribute
    total = arrays[f"{h}/integrated_gradients"].sum((1, 2))
    # ReLU kinks on the path slow the trapezoid rule's convergence: its error here, relative to
    # the largest gap, measured <= 2% at 64 steps (3.4% at 32, ~15% at 4)
    np.testing.assert_allclose(total, gap, rtol=0, atol=0.05 * np.abs(gap).max())
  assert not np.allclose(arrays["shape_preds/occlusion"], arrays["texture_preds/occlusion"])


def test_sheet_follows_the_layout(tiny):
  c, _, _, pixels, _, res, _ = tiny
  heads = list(c.heads)
  assert res["sheet"]["columns"] == ["image"] + [f"{h} {m}" for h in heads for m in job.METHODS]
  ncol, size = 1 + 2 * len(heads), c.data.image_size
  with Image.open(res["sheet"]["path"]) as im:  # 2-px borders (sheets.image_grid)
    assert im.size == (ncol * (size + 2) + 2, len(IMAGES) * (size + 2) + 2)
    first = np.asarray(im.convert("RGB"))[2:2 + size, 2:2 + size]
  i = min(range(len(IMAGES)), key=lambda k: os.path.join(*IMAGES[k][:2]))
  assert np.abs(first.astype(int) - _crop(pixels[i])).max() <= 1  # the image, de-normalised


def test_bad_inputs_say_the_fix_and_write_nothing(tiny, tmp_path):
  c = tiny[0]
  empty = tmp_path / "empty"
  os.makedirs(empty / "sub")
  cases = (({"images": str(empty)}, DataError, "holds no .jpeg/.jpg/.png images"),
           ({"images": str(tmp_path / "nowhere")}, FileNotFoundError, "does not exist"),
           ({"heads": ("shape", "avg_preds")}, ConfigError, "did you mean shape_preds?"),
           ({"family": "resnet50"}, ConfigError, "does not output; choose from logits"),
           ({"checkpoint": str(tmp_path / "no.pth")}, FileNotFoundError,
            "config.checkpoint=.*does not exist"))
  for k, (overrides, error, message) in enumerate(cases):
    cfg = apply_overrides(imagenet_heatmaps.get_config("tiny"),
                          **{"images": c.images, "data.eval_dir": c.data.eval_dir, **overrides})
    workdir = tmp_path / f"work{k}"
    with pytest.raises(error, match=message):
      job.run(cfg, str(workdir))
    assert not workdir.exists() or not [f for _, _, fs in os.walk(workdir) for f in fs]
