"""The ImageNet classifier jobs end to end on the tiny configs (synthetic folders, width-8 ResNet).

One module-scoped training run on the 4 simulated devices (2 epochs x 3 steps, evaluated after
each epoch) is shared: what it writes, its export evaluated by the evaluation job, the bitwise
resume, the 1-device run, and the tables. A fixed-batch descent checks that the loss falls.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax import checkpoints
from cgn_jax.data import imagenet, synthetic_imagenet
from cgn_jax.data.storage import DataError
from cgn_jax.jobs import evaluate_classifier_imagenet as evaluate_job
from cgn_jax.jobs import train_classifier_imagenet as job
from cgn_jax.writers import read_metrics
from configs import imagenet_classifier, imagenet_classifier_eval
from configs.common import apply_overrides


def _config(data_dir, variant="tiny", **overrides):
  c = imagenet_classifier.get_config(variant)
  return apply_overrides(c, **{"data.eval_dir": os.path.join(data_dir, "eval"), **overrides})


def _eval_config(data_dir, variant, **overrides):
  c = imagenet_classifier_eval.get_config(variant)
  return apply_overrides(c, **{"data.eval_dir": os.path.join(data_dir, "eval"), **overrides})


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
  c = _config(data_dir)
  workdir = str(tmp_path_factory.mktemp("classifier_tiny"))
  results = job.train_and_evaluate(c, workdir)
  return c, workdir, results


def _final_state(workdir):
  tree, record = checkpoints.read_train_checkpoint(workdir)
  return tree["state"], record


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_tiny_run_writes_metrics_results_tables_and_export(tiny_run):
  c, workdir, results = tiny_run
  rows = read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert steps == [3, 6]  # log.every_steps = 3 = one epoch
  for r in rows:
    for name in job.metric_names(with_cf=True):
      assert np.isfinite(r[name]), (r["step"], name)
    # the per-epoch evaluation joins the epoch's row
    assert "shape_bias/shape_preds/shape_bias" in r and "backgrounds/shape_texture_preds/bg_gap" in r
  assert rows[0]["lr"] == pytest.approx(c.train.lr)
  assert rows[1]["lr"] == pytest.approx(0.1 * c.train.lr)  # x0.1 after lr_decay_every = 1 epoch
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
  last = saved["epochs"][-1]
  assert set(last) == {"epoch", "imagenet", "shape_bias", "backgrounds"}
  assert set(last["imagenet"]) == set(job.HEADS) | {"avg_preds", "shape_texture_preds"}
  for head, acc in last["imagenet"].items():
    assert 0 <= acc["top1"] <= acc["top5"] <= 100, head
  for head, bg in last["backgrounds"].items():
    assert bg["bg_gap"] == pytest.approx(bg["mixed_same"] - bg["mixed_rand"]), head
  with open(os.path.join(workdir, "tables.md")) as f:
    tables = f.read()
  for published in ("54.8", "16.7", "22.9", "74.0", "94.2", "83.4", "80.1", "3.3"):
    assert published in tables
  meta = checkpoints.load_meta(os.path.join(workdir, "ensemble"))
  assert meta["family"] == "invariant_ensemble" and meta["step"] == 6


def test_state_after_the_run_keeps_batchnorm_statistics_frozen(tiny_run, data_dir, tmp_path):
  """BatchNorm runs in eval mode throughout (set_bn_eval): its running statistics never move,
  while its scale and bias train."""
  c, workdir, _ = tiny_run
  model = job.create_model(c)
  init = job.initial_variables(c, model, str(tmp_path))
  state, _ = _final_state(workdir)
  for k, v in _flat(init["batch_stats"]).items():
    np.testing.assert_array_equal(_flat(state["batch_stats"])[k], v, err_msg=k)
  bn_scale = "['backbone']['bn1']['scale']"
  assert not np.array_equal(_flat(state["params"])[bn_scale], _flat(init["params"])[bn_scale])


def test_evaluation_job_on_the_export_reproduces_the_last_epoch(tiny_run, data_dir, tmp_path):
  c, workdir, results = tiny_run
  for variant, tables in (("tiny_shape_bias", ("imagenet", "shape_bias")),
                          ("tiny_backgrounds", ("backgrounds",))):
    out = str(tmp_path / variant)
    got = evaluate_job.run(_eval_config(data_dir, variant, checkpoint=workdir), out)
    assert set(got) == set(tables)
    for t in tables:  # the same model on the same images: the numbers of the last epoch's eval
      assert got[t] == results["epochs"][-1][t], t
    with open(os.path.join(out, "tables.md")) as f:
      assert "(published)" in f.read()


def test_ood_sets_restrict_imagenet_a_to_its_classes(tiny_run, data_dir, tmp_path):
  """ImageNet-Sketch is plain top-1 (on the synthetic val split: the ImageNet val numbers);
  ImageNet-A takes the argmax over the folder's classes only, which can only gain."""
  _, workdir, results = tiny_run
  got = evaluate_job.run(_eval_config(data_dir, "tiny_ood", checkpoint=workdir), str(tmp_path))
  last = results["epochs"][-1]["imagenet"]
  for head, acc in got["sketch"].items():
    assert acc["top1"] == pytest.approx(last[head]["top1"]), head
    assert got["imagenet_a"][head]["top1"] >= acc["top1"], head
  # A random model spreads its argmax over all 1000 classes: restricted to the folder's 25 it
  # must get more right.
  rand = evaluate_job.run(_eval_config(data_dir, "tiny_ood"), str(tmp_path / "random"))
  assert any(rand["imagenet_a"][h]["top1"] > rand["sketch"][h]["top1"] for h in rand["sketch"])


def test_resume_after_the_first_epoch_is_bitwise(tiny_run, data_dir, tmp_path):
  _, full_dir, _ = tiny_run
  workdir = str(tmp_path / "resumed")
  job.train_and_evaluate(_config(data_dir, **{"train.epochs": 1}), workdir)
  assert int(_final_state(workdir)[0]["step"]) == 3
  job.train_and_evaluate(_config(data_dir), workdir)
  full, resumed = _flat(_final_state(full_dir)[0]), _flat(_final_state(workdir)[0])
  assert full.keys() == resumed.keys()
  for k in full:
    np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
  assert [r["step"] for r in read_metrics(workdir)] == [3, 6]


def test_one_and_four_devices_agree(tiny_run, data_dir, tmp_path):
  _, full_dir, _ = tiny_run
  one = str(tmp_path / "one")
  job.train_and_evaluate(_config(data_dir, **{"num_devices": 1, "train.epochs": 1}), one)
  r1, r4 = read_metrics(one)[0], read_metrics(full_dir)[0]
  for name in job.metric_names(with_cf=True):
    assert r1[name] == pytest.approx(r4[name], rel=1e-4, abs=1e-4), name


def test_loss_falls_on_a_fixed_batch(data_dir, tmp_path):
  """Fifteen SGD steps on one synthetic batch (real + counterfactual) lower the summed loss."""
  c = _config(data_dir, **{"train.lr": 0.01})
  data = synthetic_imagenet.resolve(c.data, str(tmp_path), c.seed)
  real = imagenet.imagenet_split(data.imagenet_dir, "train",
                                 os.path.join(data.eval_dir, "imagenet_class_index.json"))
  src = imagenet.ensemble_batches(real, imagenet.counterfactual_rows(data.cf_dir), 8, 1.0, 0,
                                  transform=imagenet.TrainTransform(c.data.image_size))
  batch = jax.tree.map(jnp.asarray, src.batch(0))
  src.close()
  model = job.create_model(c)
  tx, schedule = job.create_optimizer(c, steps_per_epoch=100)
  variables = job.initial_variables(c, model, str(tmp_path))
  state = job.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                         batch_stats=variables["batch_stats"], opt=tx.init(variables["params"]))
  step = jax.jit(job.make_train_step(model, tx, schedule))
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses  # from 4 x ln(1000) = 27.6
  # the summed loss is the real term plus the three heads' counterfactual terms
  assert float(m["loss"]) == pytest.approx(float(m["loss_real"]) + float(m["loss_cf"]), rel=1e-5)


def test_missing_folders_are_one_line_errors(data_dir, tmp_path):
  with pytest.raises(DataError, match="config.data.imagenet_dir is empty"):
    job.train_and_evaluate(_config(data_dir, variant="", **{"train.epochs": 1}), str(tmp_path / "a"))
  c = _config(data_dir, **{"data.synthetic": False, "data.imagenet_dir": str(tmp_path)})
  with pytest.raises(DataError, match="config.data.cf_dir is empty"):
    job.train_and_evaluate(c, str(tmp_path / "b"))
  with pytest.raises(DataError, match="gives 0 counterfactuals per batch of 8"):
    job.train_and_evaluate(_config(data_dir, **{"train.cf_ratio": 0.01}), str(tmp_path / "e"))
  with pytest.raises(checkpoints.CheckpointError, match="config.checkpoint is empty"):
    evaluate_job.run(_eval_config(data_dir, "tiny_backgrounds", allow_random_init=False),
                     str(tmp_path / "c"))
  with pytest.raises(DataError, match="--config.data.in9_dir=DIR"):
    evaluate_job.run(_eval_config(data_dir, "backgrounds", allow_random_init=True),
                     str(tmp_path / "d"))
