"""The MNIST CNN classifier on real, counterfactual or mixed data (the authors' mnists/train_classifier.py).

Adadelta(lr 1.0, rho 0.9, eps 1e-6: torch's defaults), learning rate times 0.7 after every epoch
(StepLR), batch 64, 10 epochs; accuracy on the variant's real test split after every epoch. The
training step is jit-compiled with the batch sharded over every device.
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
from tqdm import tqdm

from cgn_jax import parallel
from cgn_jax.data import build, storage
from cgn_jax.models.classifiers import MnistCNN


def _load(path: str, split: str) -> tuple[np.ndarray, np.ndarray, str]:
  manifest = storage.read_manifest(path)
  images, labels = storage.read_split(path, split, decode=False)
  return images, labels[manifest["target"]].astype(np.int32), manifest["image"]["encoding"]


def load_data(config, workdir: str):
  """(train images, labels, encoding), (test images, labels, encoding) per ``config.train_on``."""
  real = config.real_dataset_dir or os.path.join(workdir, "data", config.dataset)
  limit = config.dataset_limit if config.dataset_limit > 0 else None
  build.build_variant(config.dataset, config.data_dir, real, seed=config.data_seed, limit=limit)
  parts = []
  if config.train_on in ("real", "mixed"):
    parts.append(_load(real, "train"))
  if config.train_on in ("counterfactual", "mixed"):
    if not config.cf_dataset_dir:
      raise FileNotFoundError("config.cf_dataset_dir is empty; generate counterfactuals first "
                              "(configs/mnist_generate.py) and pass --config.cf_dataset_dir=DIR")
    parts.append(_load(config.cf_dataset_dir, "train"))
  if not parts:
    raise ValueError(f"config.train_on must be real, counterfactual or mixed, not '{config.train_on}'")
  # Mixed data are decoded to float32 only batch by batch; uint8 and quantised sets share a code.
  encs = {p[2] for p in parts}
  if len(encs) > 1:
    parts = [(storage.decode_images(x, e).astype(np.float16), y, "float16") for x, y, e in parts]
  train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), parts[0][2])
  if 0 < config.max_train_images < len(train[1]):  # a seeded subset (quick runs)
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(train[1]))[:config.max_train_images])
    train = (train[0][keep], train[1][keep], train[2])
  return train, _load(real, "test")


def make_steps(model: MnistCNN, tx):
  def train_step(state, images, labels):
    def loss_fn(params):
      logp, new = model.apply({"params": params, "batch_stats": state["batch_stats"]}, images,
                              train=True, mutable=["batch_stats"])
      loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))  # F.nll_loss
      return loss, (logp, new["batch_stats"])
    (loss, (logp, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                 "opt": opt}
    return new_state, loss, jnp.sum(jnp.argmax(logp, -1) == labels)

  def eval_step(state, images, labels, valid):
    logp = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, images)
    return jnp.sum((jnp.argmax(logp, -1) == labels) & valid)

  return train_step, eval_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  (x_tr, y_tr, enc_tr), (x_te, y_te, enc_te) = load_data(config, workdir)
  steps_per_epoch = len(y_tr) // config.batch_size  # the last partial batch is dropped (static shapes)
  model = MnistCNN(num_classes=10)
  schedule = optax.exponential_decay(config.lr, steps_per_epoch, config.gamma, staircase=True)
  tx = optax.adadelta(schedule, rho=0.9, eps=1e-6)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))))(jax.random.key(config.seed))
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
           "opt": tx.init(variables["params"])}
  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state = jax.device_put(state, repl)
  train_step, eval_step = make_steps(model, tx)
  train_step = jax.jit(train_step, in_shardings=(repl, data, data), out_shardings=(repl, repl, repl),
                       donate_argnums=(0,))
  eval_step = jax.jit(eval_step, in_shardings=(repl, data, data, data), out_shardings=repl)

  history = []
  t_start = time.time()
  for epoch in range(config.epochs):
    perm = np.random.default_rng([config.seed, epoch]).permutation(len(y_tr))
    correct, losses = [], []
    for i in tqdm(range(steps_per_epoch), desc=f"classifier epoch {epoch + 1}/{config.epochs}",
                  unit="step", disable=not config.progress_bar, leave=False):
      idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
      batch = parallel.shard_batch({"x": storage.decode_images(x_tr[idx], enc_tr), "y": y_tr[idx]}, mesh)
      state, loss, c = train_step(state, batch["x"], batch["y"])
      correct.append(c)
      losses.append(loss)
    train_acc = float(np.sum(jax.device_get(correct))) / (steps_per_epoch * config.batch_size)
    test_acc = evaluate(eval_step, state, x_te, y_te, enc_te, config.eval_batch_size, mesh)
    row = {"epoch": epoch + 1, "train_acc": 100 * train_acc, "test_acc": 100 * test_acc,
           "train_loss": float(np.mean(jax.device_get(losses)))}
    history.append(row)
    print(f"epoch {epoch + 1}: train acc {row['train_acc']:.2f}%  test acc {row['test_acc']:.2f}%")
  results = {"dataset": config.dataset, "train_on": config.train_on, "n_train": int(len(y_tr)),
             "cf_dataset_dir": config.cf_dataset_dir, "epochs": history,
             "final_train_acc": history[-1]["train_acc"], "final_test_acc": history[-1]["test_acc"],
             "wall_s": time.time() - t_start}
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "results.json"))
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
