"""The MNIST CNN classifier on real, counterfactual or mixed data (the authors' mnists/train_classifier.py).

Adadelta(lr 1.0, rho 0.9, eps 1e-6: torch's defaults), learning rate times 0.7 after every epoch
(StepLR), batch 64, 10 epochs; accuracy on the variant's real test split after every epoch. Runs on
the shared training loop: a checkpoint every ``checkpoint_every_epochs`` (resumed bitwise), one
metrics row per epoch, and ``results.json`` rewritten atomically after every epoch with the
accuracies so far (a killed run keeps its finished epochs; a resumed one drops the epochs it redoes).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cgn_jax import losses, parallel, training
from cgn_jax.errors import check_choice
from cgn_jax.data import batches, mnist_variants, storage
from cgn_jax.data.imagenet_cfs import atomic_write
from cgn_jax.models.classifiers import MnistCNN

RESULTS = "results.json"
TRAIN_ON = ("real", "counterfactual", "mixed")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's named choices, checked before anything is built or written."""
  check_choice(config, "train_on", TRAIN_ON)
  check_choice(config, "dataset", mnist_variants.VARIANTS)


def load_data(config, workdir: str):
  """(train images, labels, encoding), (test images, labels, encoding) per ``config.train_on``."""
  real = batches.variant_dir(config, workdir, "real_dataset_dir")
  parts = []
  if config.train_on in ("real", "mixed"):
    parts.append(batches.load_split(real, "train"))
  if config.train_on in ("counterfactual", "mixed"):
    if not config.cf_dataset_dir:
      raise FileNotFoundError("config.cf_dataset_dir is empty; generate counterfactuals first "
                              "(configs/mnist_generate.py) and pass --config.cf_dataset_dir=DIR")
    parts.append(batches.load_split(config.cf_dataset_dir, "train"))
  # Mixed data are decoded to float32 only batch by batch; uint8 and quantised sets share a code.
  encs = {p[2] for p in parts}
  if len(encs) > 1:
    parts = [(storage.decode_images(x, e).astype(np.float16), y, "float16") for x, y, e in parts]
  train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), parts[0][2])
  if 0 < config.max_train_images < len(train[1]):  # a seeded subset (quick runs)
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(train[1]))[:config.max_train_images])
    train = (train[0][keep], train[1][keep], train[2])
  return train, batches.load_split(real, "test")


def make_steps(model: MnistCNN, tx):
  """``train_step(state, batch, key, constants) -> (state, {train_loss, train_acc})`` and
  ``eval_step(state, images, labels, valid) -> correct count``."""

  def train_step(state, batch, key, constants=None):
    del key, constants  # deterministic: no dropout, no augmentation
    images, labels = batch["image"], batch["label"]

    def loss_fn(params):
      logp, new = model.apply({"params": params, "batch_stats": state["batch_stats"]}, images,
                              train=True, mutable=["batch_stats"])
      loss = losses.nll_loss(logp, labels)
      return loss, (logp, new["batch_stats"])
    (loss, (logp, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                 "opt": opt}
    accuracy = 100 * jnp.mean((jnp.argmax(logp, -1) == labels).astype(jnp.float32))
    return new_state, {"train_loss": loss, "train_acc": accuracy}

  def eval_step(state, images, labels, valid):
    logp = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, images)
    return jnp.sum((jnp.argmax(logp, -1) == labels) & valid)

  return train_step, eval_step


def _write_results(workdir: str, results: dict) -> None:
  text = json.dumps(results, indent=1)
  atomic_write(os.path.join(workdir, RESULTS), lambda f: f.write(text.encode()))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the classifier in ``workdir``; returns the contents of results.json."""
  check_inputs(config)
  t_start = time.time()
  results: dict = {}

  def build(mesh) -> training.Task:
    parallel.check_batch_size(config.batch_size, mesh, "batch_size")
    (x_tr, y_tr, enc_tr), (x_te, y_te, enc_te) = load_data(config, workdir)
    data = batches.EpochBatches(x_tr, y_tr, enc_tr, config.batch_size, config.seed)
    per_epoch = data.steps_per_epoch
    model = MnistCNN(num_classes=10)
    schedule = optax.exponential_decay(config.lr, per_epoch, config.gamma, staircase=True)
    tx = optax.adadelta(schedule, rho=0.9, eps=1e-6)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))))(jax.random.key(config.seed))
    train_step, eval_step = make_steps(model, tx)
    repl, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    eval_step = jax.jit(eval_step, in_shardings=(repl, rows, rows, rows), out_shardings=repl)
    results.update({"dataset": config.dataset, "train_on": config.train_on,
                    "n_train": int(len(y_tr)), "cf_dataset_dir": config.cf_dataset_dir, "epochs": []})

    def test_accuracy(state, step: int) -> dict[str, float]:
      return {"test_acc": 100 * evaluate(eval_step, state, x_te, y_te, enc_te,
                                         config.eval_batch_size, mesh)}

    def on_resume(step: int) -> None:  # the epochs after the checkpoint are trained again
      path = os.path.join(workdir, RESULTS)
      if step and os.path.exists(path):
        with open(path) as f:
          results["epochs"] = [r for r in json.load(f)["epochs"] if r["epoch"] <= step // per_epoch]

    def on_log(step: int, row: dict[str, float]) -> None:
      if step % per_epoch == 0:
        results["epochs"].append({"epoch": step // per_epoch, "train_acc": row["train_acc"],
                                  "test_acc": row["test_acc"], "train_loss": row["train_loss"]})
        if jax.process_index() == 0:
          _write_results(workdir, results)
          print(f"epoch {step // per_epoch}: train acc {row['train_acc']:.2f}%  "
                f"test acc {row['test_acc']:.2f}%", flush=True)

    return training.Task(
        name=f"classifier {config.dataset} ({config.train_on})",
        state={"params": variables["params"], "batch_stats": variables["batch_stats"],
               "opt": tx.init(variables["params"])},
        step_fn=train_step, metrics=("train_loss", "train_acc"),
        num_steps=config.epochs * per_epoch, key=jax.random.key(config.seed),
        batches=data, params=lambda s: s["params"],
        hooks=[training.Hook(per_epoch, test_accuracy, all_processes=True)],
        on_log=on_log, on_resume=on_resume, bar_keys=("train_loss", "train_acc"),
        # One metrics row per epoch (the epoch's means), a checkpoint every few epochs.
        log_every=per_epoch, checkpoint_every=per_epoch * config.log.checkpoint_every_epochs)

  training.run(config, workdir, build)
  last = results["epochs"][-1] if results.get("epochs") else {}
  results.update(final_train_acc=last.get("train_acc"), final_test_acc=last.get("test_acc"),
                 wall_s=time.time() - t_start)
  if jax.process_index() == 0:
    _write_results(workdir, results)
  return results


def evaluate(eval_step, state, images, labels, encoding, batch_size, mesh) -> float:
  """Accuracy over the whole split; the last batch is padded and masked (the true count)."""
  total = 0
  for s in range(0, len(labels), batch_size):
    x = storage.decode_images(images[s:s + batch_size], encoding)
    y = labels[s:s + batch_size]
    n = len(y)
    valid = np.arange(batch_size) < n
    if n < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(batch_size - n, y.dtype)])
    b = parallel.shard_batch({"x": x, "y": y, "v": valid}, mesh)
    total += eval_step(state, b["x"], b["y"], b["v"])
  return float(total) / len(labels)
