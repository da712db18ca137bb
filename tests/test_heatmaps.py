"""Evidence heatmaps: integrated gradients against closed forms and completeness, occlusion on a
model that reads one known region, the IoU on hand-made masks, the ensemble's heads, and the
``explain_classifier`` job end to end on ``:tiny`` with random CNNs saved as its loader reads them.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cgn_jax import checkpoints
from cgn_jax.data import batches, storage
from cgn_jax.errors import ConfigError
from cgn_jax.evaluation import heatmaps as hm
from cgn_jax.jobs import explain_classifier as job
from cgn_jax.models import classifiers, resnet
from configs import mnist_heatmaps
from configs.common import apply_overrides


def _linear(w, x):
  return jnp.einsum("nhwc,hwck->nk", x, w)


def test_ig_of_a_linear_model_is_w_times_x_minus_baseline():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 6, 2, 3)).astype(np.float32)
  x = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)
  t = np.array([0, 2, 1, 2])
  w_t = np.moveaxis(w[..., t], -1, 0)  # (N, H, W, C): the target's weights per image
  for rule, baseline in (("trapezoid", 0.0), ("riemann_left", 0.5)):
    attr, gap = hm.integrated_gradients_fn(_linear, steps=3, rule=rule, score="logit")(
        w, x, baseline, t)
    np.testing.assert_allclose(attr, w_t * (x - baseline), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gap, (w_t * (x - baseline)).sum((1, 2, 3)), rtol=1e-5, atol=1e-5)


def _small_cnn(params, x):
  """conv 3x3 (2 -> 4), tanh + square, mean pool, dense -> 3 logits: smooth (the trapezoid
  rule's error order holds), non-linear, cheap to compile."""
  k, d = params
  h = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.mean(jnp.tanh(h) + 0.3 * h ** 2, axis=(1, 2)) @ d


def test_ig_completeness_on_a_small_cnn_converges_with_steps():
  rng = np.random.default_rng(1)
  params = (rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
            rng.normal(size=(4, 3)).astype(np.float32))
  x = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
  t = np.array([0, 1, 2])  # fixed classes: a saturated prediction would leave no gap
  errors = []
  for steps in (16, 64):
    attr, gap = hm.integrated_gradients_fn(_small_cnn, steps=steps, chunk=3)(params, x, -0.5, t)
    errors.append(np.abs(np.asarray(attr).sum((1, 2, 3)) - gap))
  assert np.all(np.abs(gap) > 0.3)  # a non-trivial gap to attribute
  assert np.all(errors[1] < 1e-3 * np.abs(gap))
  # the trapezoid rule's error falls as 1/steps^2: 16 times lower at 4 times the steps (measured
  # 6-16 here; a first-order rule would give 4)
  assert np.all(errors[1] < errors[0] / 5)


def test_occlusion_matches_the_closed_form_on_a_region_model():
  """Logit = a * (sum of one channel over a region R): a patch's drop is a * sum over R of
  (x - baseline) inside it, and a pixel's heat the mean over its patches."""
  h, w, patch, stride, base = 10, 10, 3, 2, 0.25
  region = np.zeros((h, w), bool)
  region[2:5, 6:9] = True
  coef = np.float32(1.5)

  def model(a, x):
    s = a * jnp.sum(x[..., 0] * region, axis=(1, 2))
    return jnp.stack([s, jnp.zeros_like(s)], -1)

  x = np.random.default_rng(2).uniform(0.5, 1.0, (2, h, w, 2)).astype(np.float32)
  heat = np.asarray(hm.occlusion_fn(model, patch=patch, stride=stride, baseline=base,
                                    score="logit", chunk=7)(coef, x, np.zeros(2, np.int32)))
  masks = hm.patch_masks(h, w, patch, stride)
  assert masks.shape == (25, h, w) and masks.sum(0).min() >= 1  # 0,2,4,6 and the border 7
  want = np.zeros((2, h, w))
  for m in masks.astype(bool):
    drop = coef * ((x[..., 0] - base) * (m & region)).sum((1, 2))
    want += drop[:, None, None] * m
  want /= masks.sum(0)
  np.testing.assert_allclose(heat, want, rtol=1e-5, atol=1e-6)
  # the heat sits on R and on the patches that overlap it, nowhere else
  near = np.zeros((h, w), bool)
  for m in masks.astype(bool):
    if (m & region).any():
      near |= m
  assert np.all(heat[:, ~near] == 0) and np.all(heat[:, region] > 0)
  assert all(region.reshape(-1)[np.argmax(hh)] for hh in heat.reshape(2, -1))


def test_occlusion_ranks_patches_of_a_saturated_classifier():
  """Logits (20 + sum over R, 0, 0): the top class's log-probability -log(1 + 2 exp(-s)) is
  ~ -4e-9, which log_softmax rounds to 0 in float32 (every drop 0); ours keeps it, and the heat
  matches a float64 reference."""
  h = w = 8
  region = np.zeros((h, w), bool)
  region[2:4, 2:4] = True  # exactly one patch

  def model(_, x):
    s = 20.0 + jnp.sum(x[..., 0] * region, axis=(1, 2))
    return jnp.stack([s, jnp.zeros_like(s), jnp.zeros_like(s)], -1)

  x = np.full((1, h, w, 1), 0.5, np.float32)
  heat = np.asarray(hm.occlusion_fn(model, patch=2, stride=2)(None, x))
  masks = hm.patch_masks(h, w, 2, 2).astype(bool)
  logp = lambda img: -np.log1p(2 * np.exp(-(20.0 + img[region].sum())))
  want = sum((logp(x[0, ..., 0]) - logp(np.where(m, 0.0, x[0, ..., 0]))) * m for m in masks)
  np.testing.assert_allclose(heat[0], want, rtol=1e-3, atol=1e-15)
  assert heat[0][region].min() > 0 and np.all(heat[0][~region] == 0)


def test_top_k_mask_iou_and_chance_on_hand_made_arrays():
  heat = np.array([[[0.9, 0.1], [0.1, -0.8]]])  # ties: the first in raster order wins
  assert hm.top_k_mask(heat, np.array([3])).tolist() == [[[True, True], [True, False]]]
  assert hm.top_k_mask(np.abs(heat), np.array([3])).tolist() == [[[True, True], [False, True]]]
  a = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]], bool)
  b = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]]], bool)
  np.testing.assert_allclose(hm.iou(a, b), [1 / 3, 1.0, 0.0])
  mask = np.zeros((1, 4, 4), bool)
  mask[0, :2, :2] = True  # area 4 of 16
  assert hm.heat_iou(mask * 3.0 - 1.0, mask)[0] == 1.0  # |heat| 2 on the mask, 1 elsewhere
  assert hm.heat_iou(mask * 1.5 - 2.0, mask)[0] == 0.0  # |heat| 0.5 on the mask, 2 elsewhere
  assert hm.heat_iou(mask * 1.5 - 2.0, mask, sign="positive")[0] == 1.0  # -0.5 > -2
  assert hm.heat_iou(~mask * 1.0, mask)[0] == 0.0
  # fraction 0.5: the 8 hottest pixels, the 4 of the mask among them -> 4 / 8
  assert hm.heat_iou(mask * 2.0 + np.arange(16).reshape(1, 4, 4) / 100, mask, 0.5)[0] == 0.5
  # random ranking: E[I] = 4 * 4 / 16 = 1, so 1 / (4 + 4 - 1)
  np.testing.assert_allclose(hm.chance_iou(mask), [1 / 7])
  rng = np.random.default_rng(3)
  sims = [hm.heat_iou(rng.random((1, 4, 4)), mask)[0] for _ in range(400)]
  assert abs(np.mean(sims) - 1 / 7) < 0.03  # the ratio of expectations is close to the mean


def _random_variables(model, x, seed):
  """Variables of ``model`` drawn with numpy (fan-in scaled normals, BN stats 0 / 1): no compiled
  ``init`` (XLA's random bits dominate a small model's compile time)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return (np.ones if "var" in name else np.zeros)(leaf.shape, leaf.dtype)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    scale = 1 / np.sqrt(fan_in) if len(leaf.shape) > 1 else 0.1
    return (rng.normal(size=leaf.shape) * scale).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_ensemble_heads_share_a_pass_and_each_explains_its_own_head():
  """A random width-2 InvariantEnsemble: every head's IG is complete against its own gap, and an
  occlusion patch over the whole image (another code path) drops each head's score by that gap."""
  model = resnet.InvariantEnsemble(blocks=(1, 1, 1, 1), width=2, num_classes=5)
  x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = _random_variables(model, x[:1], seed=5)
  apply_fn = hm.ensemble_apply_fn(model)
  targets = {"shape_preds": np.array([0, 1]), "texture_preds": np.array([2, 3]),
             "bg_preds": np.array([4, 0])}
  attr, gap = hm.integrated_gradients_fn(apply_fn, steps=64, chunk=32)(variables, x, 0.0, targets)
  whole = hm.occlusion_fn(apply_fn, patch=32, stride=32)(variables, x, targets)
  assert set(attr) == set(gap) == set(whole) == {"shape_preds", "texture_preds", "bg_preds"}
  for head in attr:
    total = np.asarray(attr[head]).sum((1, 2, 3))
    # ReLU kinks along the path: the error shrinks slowly (measured <= 3.3e-3 at 64 steps)
    np.testing.assert_allclose(total, gap[head], rtol=0.05, atol=5e-3)
    np.testing.assert_allclose(np.asarray(whole[head])[:, 0, 0], gap[head], rtol=1e-4, atol=1e-5)
  assert not np.allclose(gap["shape_preds"], gap["texture_preds"])  # three different heads


# -- the job --------------------------------------------------------------------------------------


def _save_training_workdir(workdir, variables):
  """A classifier checkpoint as ``train_classifier`` leaves it (the loop's state tree)."""
  ckpt = checkpoints.TrainCheckpointer(workdir)
  ckpt.save(7, {"state": {"params": variables["params"], "batch_stats": variables["batch_stats"]}},
            {"data": {}})
  ckpt.close()


@pytest.fixture(scope="module")
def tiny_job(data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("heatmaps")
  model = classifiers.MnistCNN()
  x = np.zeros((1, 32, 32, 3), np.float32)
  real = str(root / "classifier_real")
  _save_training_workdir(real, _random_variables(model, x, seed=6))
  converted = str(root / "converted_cnn")  # the converted-dir path of the loader
  checkpoints.save_variables(converted, _random_variables(model, x, seed=7),
                             {"family": "mnist_classifier", "model_config": {"num_classes": 10}})
  c = apply_overrides(mnist_heatmaps.get_config("tiny"),
                      **{"data_dir": data_dir, "classifiers.real": real,
                         "classifiers.counterfactual": converted})
  workdir = str(root / "work")
  return c, workdir, job.run(c, workdir)


def test_tiny_job_writes_sheet_results_and_iou(tiny_job):
  c, workdir, res = tiny_job
  with open(os.path.join(workdir, job.RESULTS)) as f:
    assert json.load(f) == json.loads(json.dumps(res))
  assert res["num_images"] == c.num_images and set(res["classifiers"]) == {"real", "counterfactual"}
  assert "step 7" in res["classifiers"]["real"]["checkpoint"]
  for r in res["classifiers"].values():
    for method in job.METHODS:
      for sign in hm.SIGNS:
        assert 0 <= r[method][sign]["mean"] <= 1
    assert r["ig_completeness_error"] < 0.5  # 4 trapezoid steps on a random CNN
  assert 0 < res["chance_iou"]["mean"] < 0.5
  names = sorted(res["classifiers"])  # ConfigDict's order
  cols = ["image", "mask"] + [f"{n} {m}" for n in names for m in job.METHODS]
  assert res["sheet"]["columns"] == cols
  with Image.open(res["sheet"]["path"]) as im:  # 3 rows, 6 columns of 32 px, 2 px borders
    assert im.size == (6 * 34 + 2, 3 * 34 + 2)
  arrays = np.load(os.path.join(workdir, job.ARRAYS))
  assert arrays["real/occlusion"].shape == arrays["masks"].shape == (c.num_images, 32, 32)
  np.testing.assert_allclose(  # the stored heat gives the reported IoU
      hm.heat_iou(arrays["real/integrated_gradients"], arrays["masks"]).mean(),
      res["classifiers"]["real"]["integrated_gradients"]["abs"]["mean"])


def test_tiny_job_masks_lie_on_the_digits(tiny_job, data_dir):
  """Within each Double-colored image every mask pixel has the digit's one colour, and the mask
  holds most of the pixels of that colour (the digit > 128 is the core of the > 25 stroke)."""
  c, workdir, _ = tiny_job
  path, raw = job.dataset_dir(c, workdir)
  stored, _, encoding = batches.load_split(path, "test")
  images = storage.decode_images(stored[:c.num_images], encoding)
  masks = job.digit_masks(c.dataset, raw, "test", c.num_images, c.foreground_threshold)
  checked = 0
  for img, m in zip(images, masks):
    on = img[m]
    assert m.sum() > 20 and np.all(on == on[0])
    same = np.all(img == on[0], axis=-1)
    if not same.all():  # (a digit drawn in its background's colour shows nothing)
      assert 0.4 < m.sum() / same.sum() <= 1
      checked += 1
  assert checked >= c.num_images // 2


def test_no_classifier_is_one_line_error():
  c = mnist_heatmaps.get_config("tiny")
  with pytest.raises(ConfigError, match="--config.classifiers.real=DIR"):
    job.classifier_paths(c)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    job.classifier_paths(apply_overrides(c, **{"classifiers.real": "/no/such/dir"}))
