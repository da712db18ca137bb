"""The loss ablation (paper Table 1): each row's config zeroes exactly its lambdas, a zero weight
passed to the compiled losses at run time removes its term exactly (value and gradient), every row
runs one compiled function, and the driver's row loop, resume, refusals and table (its two jobs
stood in for: see below)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax import checkpoints
from cgn_jax.jobs import train_cgn_imagenet as job
from cgn_jax.models.imagenet_cgn import MASK_CLAMP
from configs import imagenet, imagenet_ablation

# The [Re] driver's --disable_loss choices (experiments/loss_ablation.py), written out here
# independently of configs/imagenet_ablation.py's table.
RE_ZEROED = {"full": set(), "no_shape": {"binary", "mask"}, "no_text": {"text"},
             "no_bg": {"bg"}, "no_rec": {"l1", "perc"}}
# Which loss term (cgn_losses' names) each lambda weighs.
TERM_OF = {"l1": "l1", "perc": "perc", "binary": "binary", "mask": "mask", "text": "perc_text",
           "bg": "bg"}


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("row", list(RE_ZEROED))
def test_each_row_zeroes_exactly_its_lambdas(row, tiny):
  variant = f"tiny_{row}" if tiny else row
  got = _flat(imagenet_ablation.get_config(variant).to_dict())
  base = _flat(imagenet.get_config("tiny" if tiny else "").to_dict())
  assert got.keys() == base.keys()
  changed = {k for k in got if got[k] != base[k]}
  assert changed == {f"lambdas.{n}" for n in RE_ZEROED[row]}, (variant, changed)
  for name in RE_ZEROED[row]:
    assert np.any(np.asarray(base[f"lambdas.{name}"]) != 0), name  # the default was not 0 already
    assert np.all(np.asarray(got[f"lambdas.{name}"]) == 0), name
  assert imagenet_ablation.get_config("" if not tiny else "tiny").to_dict() == \
      imagenet.get_config("tiny" if tiny else "").to_dict()


# --- a zero runtime weight == the term removed by hand, at the loss-function level -------------
# A tiny stand-in for VGG16's hooked activations (4 blocks of conv + ReLU, pooled between): the
# weighting under test does not depend on which network produces the features.
_KERNELS = [np.random.RandomState(i).randn(3, 3, cin, 6).astype(np.float32) * 0.3
            for i, cin in enumerate((3, 6, 6, 6))]


def _features_fn(images, num_blocks=4):
  feats, x = [], images
  for k in _KERNELS[:num_blocks]:
    x = jax.nn.relu(jax.lax.conv_general_dilated(x, jnp.asarray(k), (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
    feats.append(x)
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return feats


def _outputs():
  """The CGN outputs the losses read; the mask touches both clamp bounds (where an unguarded
  binary entropy would be infinite) and the interval bounds."""
  r = np.random.RandomState(0)
  n, s = 2, 32
  img = lambda: np.tanh(r.randn(n, s, s, 3)).astype(np.float32)
  mask = np.clip(1 / (1 + np.exp(-3 * r.randn(n, s, s, 1))), *MASK_CLAMP).astype(np.float32)
  mask[0, :4] = MASK_CLAMP[0]
  mask[1, -4:] = MASK_CLAMP[1]
  bg_mask = (1 / (1 + np.exp(-r.randn(n, s, s, 1)))).astype(np.float32)
  return {"x_gen": img(), "x_gt": img(), "mask": mask, "foreground": img(), "bg_mask": bg_mask}


DIFFERENTIABLE = ("x_gen", "mask", "foreground", "bg_mask")  # x_gt is a detached target
TERMS = ("l1", "perc", "binary", "mask", "perc_text", "bg")


@pytest.fixture(scope="module")
def loss_fns():
  c = imagenet.get_config("tiny")
  tex_keys = jax.random.split(jax.random.key(5), 2)

  def terms(live, out, weights):
    return job.cgn_losses({**out, **live}, _features_fn, tex_keys, c, weights)

  def split(out):
    return {k: out[k] for k in DIFFERENTIABLE}, {k: out[k] for k in out if k not in DIFFERENTIABLE}

  # Runtime weights: value and gradient of the total, one compiled function for every row.
  runtime = jax.jit(lambda live, rest, w: jax.value_and_grad(
      lambda l: terms(l, rest, w)["total"])(live))
  # The reference: the config's Python numbers (the static path), each term and its own gradient.
  static_terms = jax.jit(lambda live, rest: terms(live, rest, None))
  static_grads = jax.jit(lambda live, rest: jax.jacrev(
      lambda l: {t: v for t, v in terms(l, rest, None).items() if t != "total"})(live))
  live, rest = split(_outputs())
  return {"runtime": runtime, "live": live, "rest": rest,
          "terms": jax.device_get(static_terms(live, rest)),
          "grads": jax.device_get(static_grads(live, rest))}


@pytest.mark.parametrize("row", list(RE_ZEROED))
def test_zero_weight_equals_the_term_removed_by_hand(loss_fns, row):
  weights = job.loss_weights(imagenet_ablation.get_config(f"tiny_{row}"))
  total, grads = jax.device_get(loss_fns["runtime"](loss_fns["live"], loss_fns["rest"], weights))
  kept = [t for t in TERMS if t not in {TERM_OF[n] for n in RE_ZEROED[row]}]
  ref_total = sum(float(loss_fns["terms"][t]) for t in kept)
  assert float(total) == pytest.approx(ref_total, rel=1e-6), row
  for name in DIFFERENTIABLE:
    ref = sum(np.asarray(loss_fns["grads"][t][name], np.float64) for t in kept)
    got = np.asarray(grads[name], np.float64)
    assert np.all(np.isfinite(got)), (row, name)
    scale = np.max(np.abs(ref)) if np.any(ref) else 1.0
    assert np.max(np.abs(got - ref)) <= 1e-5 * scale, (row, name)
  # The inputs that only the zeroed terms read get an exactly zero gradient.
  only = {"no_shape": "mask", "no_text": "foreground", "no_bg": "bg_mask", "no_rec": "x_gen"}
  if row in only:
    assert np.all(np.asarray(grads[only[row]]) == 0), row
  for name in DIFFERENTIABLE:  # and every input reads some term in the full row
    assert row != "full" or np.any(np.asarray(grads[name]) != 0), name


def test_every_row_runs_one_compiled_function(loss_fns):
  """Five rows' weights through the runtime-weights function: one trace, one compile."""
  for row in RE_ZEROED:
    loss_fns["runtime"](loss_fns["live"], loss_fns["rest"],
                        job.loss_weights(imagenet_ablation.get_config(f"tiny_{row}")))
  assert loss_fns["runtime"]._cache_size() == 1  # pylint: disable=protected-access


# --- the driver ------------------------------------------------------------------------------
# Its jobs are stood in for here: one tiny row costs 60-100 s of CPU even with the train step's
# compilation served by the persistent cache (tracing and lowering it again, loading the cached
# executable, the evaluation's own compilations), so the real two-row run is measured by hand
# (/work/notes/i12/readme_ablation.md), not in CI. The stand-ins write what the real jobs write
# (the training's export meta, evaluate_generation's metrics file).

def _fake_jobs(calls, fail_eval=()):
  def run_job(config, workdir):
    calls.append((config.job, workdir, config))
    if config.job == "train_cgn_imagenet":
      checkpoints.replace_variables(os.path.join(workdir, "cgn"), {"w": np.zeros(1)},
                                    {"family": "imagenet_cgn", "step": config.train.episodes})
      return None
    row = os.path.basename(os.path.dirname(workdir))
    if row in fail_eval:
      raise RuntimeError("evaluation interrupted")
    k = imagenet_ablation.ROWS.index(row)
    metrics = {"inception_score": {"mean": 10.0 + k, "std": 0.25}, "fid": None,
               "mask": {"mean": 0.1 * (k + 1), "std": 0.05, "frac_empty": 0.0, "frac_full": 0.0}}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "generation_metrics.json"), "w") as f:
      json.dump(metrics, f)
    return metrics
  return run_job


@pytest.fixture
def driver(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "scripts"))
  import loss_ablation  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(loss_ablation, "FIXTURES", "/fixtures")
  return loss_ablation


def test_driver_runs_each_row_resumes_and_prints_the_table(driver, monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(driver, "run_job", _fake_jobs(calls, fail_eval=("no_rec",)))
  work = str(tmp_path)
  args = ["--tiny", "--workdir", work, "--rows", "full", "no_rec", "--train", "seed=3"]
  with pytest.raises(RuntimeError, match="interrupted"):  # no_rec's evaluation dies
    driver.main(args)
  assert [(j, os.path.relpath(w, work)) for j, w, _ in calls] == [
      ("train_cgn_imagenet", "full/train"), ("evaluate_generation", "full/eval"),
      ("train_cgn_imagenet", "no_rec/train"), ("evaluate_generation", "no_rec/eval")]
  for job_name, w, c in calls:
    if job_name == "train_cgn_imagenet":  # the row's tiny config, with the overrides
      row = os.path.relpath(w, work).split("/")[0]
      want = imagenet_ablation.get_config(f"tiny_{row}")
      assert c.lambdas.to_dict() == want.lambdas.to_dict() and c.model == want.model
      assert c.seed == 3 and c.train.episodes == driver.TINY_TRAIN["train.episodes"]
    else:
      assert c.source == "cgn" and c.path == os.path.join(os.path.dirname(w), "train", "cgn")
      assert c.inception_checkpoint == "/fixtures/inception_v3_fid.pth" and c.fid_reference == ""
      assert c.num_images == driver.TINY_EVAL["num_images"] and c.splits == 2

  calls.clear()  # the rerun: full is done, no_rec's training is done, only its evaluation runs
  monkeypatch.setattr(driver, "run_job", _fake_jobs(calls))
  results = driver.main(args)
  assert [(j, os.path.relpath(w, work)) for j, w, _ in calls] == [("evaluate_generation",
                                                                   "no_rec/eval")]
  assert results["no_rec"]["inception_score"]["mean"] == 14.0
  table = open(os.path.join(work, "ablation.md")).read()
  lines = {l.split("|")[1].strip(): [x.strip() for x in l.split("|")[2:-1]]
           for l in table.splitlines() if l.startswith("| ")}
  assert lines["full"] == ["none", "10 ± 0.25", "130.2", "0.1 ± 0.05", "0.3"]
  assert lines["no_rec"] == ["l1, perc", "14 ± 0.25", "38.4", "0.5 ± 0.05", "0.3"]
  assert lines["no_text"] == ["text", "—", "198.4", "—", "0.9"]
  assert lines["BigGAN-deep-256"][2] == "202.9"
  assert json.load(open(os.path.join(work, "ablation.json"))) == results

  calls.clear()
  assert driver.main(args) == results and calls == []  # everything finished: nothing runs


def test_driver_refuses_other_settings_and_bad_inputs(driver, monkeypatch, tmp_path):
  monkeypatch.setattr(driver, "run_job", _fake_jobs([]))
  driver.main(["--tiny", "--workdir", str(tmp_path), "--rows", "full"])
  with pytest.raises(SystemExit, match="other settings \\(eval\\); rerun with the same"):
    driver.main(["--tiny", "--workdir", str(tmp_path), "--eval", "splits=1"])
  with pytest.raises(SystemExit, match="--inception_checkpoint="):
    driver.main(["--workdir", str(tmp_path / "full_size"), "--rows", "no_bg"])
  with pytest.raises(SystemExit, match="KEY=VALUE"):
    driver.main(["--tiny", "--workdir", str(tmp_path / "x"), "--train", "episodes"])
  with pytest.raises(SystemExit, match="no field train.episode; did you mean train.episodes"):
    driver.main(["--tiny", "--workdir", str(tmp_path / "x"), "--train", "train.episode=5"])
  assert not os.path.exists(tmp_path / "x")  # refused before anything was written
