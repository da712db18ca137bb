"""The invariant classifier ensemble on ImageNet + counterfactuals (the authors'
imagenet/train_classifier.py), on the shared training loop.

One step (their ``train()``): the ensemble in train mode but every BatchNorm in eval mode
(``set_bn_eval``: running statistics used and frozen, scale and bias still trained); cross-entropy
of ``avg_preds`` on a real ImageNet batch, plus, on a counterfactual batch, each head's
cross-entropy on its own label (shape, texture, background); the two backward passes' gradients
summed; one SGD step (momentum 0.9, weight decay 1e-4 on every parameter), the learning rate x0.1
every ``lr_decay_every`` epochs. After every ``eval.every_epochs`` epochs: ImageNet val per head,
shape bias per head, IN-9 and the BG-gap (``cgn_jax.evaluation.classifier_eval``), logged and kept
in ``results.json``.

Their bugs not inherited: the best-checkpoint metric ``acc1/0_overall`` is never produced by their
``validate()`` (a KeyError after the first epoch); here the latest checkpoint is kept and the
results of every epoch are in ``results.json``. Their counterfactual loader looks for
``*_silhouette.jpg`` while their generator writes ``*_x_gen.jpg``; we read what generation writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cgn_jax import checkpoints, losses, parallel, training
from cgn_jax.checkpoints import CheckpointError
from cgn_jax.data import imagenet, synthetic_imagenet
from cgn_jax.data.imagenet_cfs import atomic_write
from cgn_jax.data.storage import DataError
from cgn_jax.errors import check_choice
from cgn_jax.evaluation import classifier_eval
from cgn_jax.models import resnet

RESULTS = "results.json"
HEADS = ("shape_preds", "texture_preds", "bg_preds")
CF_LABEL = {"shape_preds": "shape_label", "texture_preds": "texture_label", "bg_preds": "bg_label"}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any  # frozen: BatchNorm runs in eval mode throughout training
  opt: Any


def create_model(config: ml_collections.ConfigDict) -> resnet.InvariantEnsemble:
  return resnet.ensemble_from_fields(config.model)


def initial_variables(config, model: resnet.InvariantEnsemble, workdir: str) -> Any:
  """A converted ensemble (``init_checkpoint``), else torchvision's ResNet as the backbone with
  fresh heads (``pretrained``, their ``--pretrained``), else torchvision's initialisation."""
  key = jax.random.key(config.seed)
  cache = os.path.join(workdir, "converted")
  if config.init_checkpoint:
    loaded, variables = resnet.load(config.init_checkpoint, cache, family="invariant_ensemble")
    _check_architecture(loaded, model, config.init_checkpoint)
    return variables
  if config.pretrained:
    loaded, variables = resnet.load(config.pretrained, cache, family="resnet50")
    _check_architecture(loaded, model, config.pretrained)
    return resnet.ensemble_from_resnet(variables, key, model)
  return resnet.init_variables(model, key, config.data.image_size)


def _check_architecture(loaded, model, path: str) -> None:
  got = (tuple(loaded.blocks), loaded.width, loaded.num_classes)
  want = (tuple(model.blocks), model.width, model.num_classes)
  if got != want:
    raise CheckpointError(f"{path} holds a ResNet with blocks/width/classes {got}, the config asks "
                          f"for {want}; set --config.model.blocks/width/num_classes to match")


def create_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Any]:
  """torch SGD(momentum, weight_decay) under their adjust_learning_rate step schedule.

  torch adds ``wd * p`` to the gradient before the momentum buffer, and scales the buffer by the
  current lr: ``add_decayed_weights`` then ``sgd`` (trace, then -lr) is the same update.
  Returns the optimizer and its learning-rate schedule (logged).
  """
  t = config.train
  every = t.lr_decay_every * steps_per_epoch
  n_decays = max(t.epochs // max(t.lr_decay_every, 1), 0)
  schedule = optax.piecewise_constant_schedule(
      t.lr, {every * (i + 1): 0.1 for i in range(n_decays)})
  return optax.chain(optax.add_decayed_weights(t.weight_decay),
                     optax.sgd(schedule, momentum=t.momentum)), schedule


def _topk(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  top = jax.lax.top_k(logits, k)[1]
  return 100 * jnp.mean(jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32))


def _cf_metric(head: str, k: int) -> str:
  """``top1_cf_shape`` etc.: a head's top-k on its own counterfactual label."""
  return f"top{k}_cf_{head.split('_')[0]}"


def metric_names(with_cf: bool) -> tuple[str, ...]:
  names = ["loss", "loss_real", "top1_real", "top5_real", "lr"]
  if with_cf:
    names += ["loss_cf"] + [_cf_metric(h, k) for h in HEADS for k in (1, 5)]
  return tuple(names)


def make_train_step(model: resnet.InvariantEnsemble, tx, schedule):
  """``train_step(state, batch, key, constants) -> (state, metrics)``; deterministic (the data
  augmentation happens on the host)."""

  def train_step(state: TrainState, batch: dict, key=None, constants=None):
    del key, constants

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      real = model.apply(variables, batch["real"]["image"], train=False)
      loss_real = losses.cross_entropy(real["avg_preds"], batch["real"]["label"])
      aux = {"real": real}
      loss = loss_real
      if "cf" in batch:
        cf = model.apply(variables, batch["cf"]["image"], train=False)
        loss_cf = sum(losses.cross_entropy(cf[h], batch["cf"][CF_LABEL[h]]) for h in HEADS)
        aux.update(cf=cf, loss_cf=loss_cf)
        loss = loss + loss_cf
      return loss, (loss_real, aux)

    (loss, (loss_real, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt = tx.update(grads, state.opt, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt=opt)
    labels = batch["real"]["label"]
    out = {"loss": loss, "loss_real": loss_real, "lr": schedule(state.step),
           "top1_real": _topk(aux["real"]["avg_preds"], labels, 1),
           "top5_real": _topk(aux["real"]["avg_preds"], labels, 5)}
    if "cf" in batch:
      out["loss_cf"] = aux["loss_cf"]
      for h in HEADS:
        for k in (1, 5):
          out[_cf_metric(h, k)] = _topk(aux["cf"][h], batch["cf"][CF_LABEL[h]], k)
    return new, out

  return train_step


def _write_results(workdir: str, results: dict) -> None:
  text = json.dumps(results, indent=1)
  atomic_write(os.path.join(workdir, RESULTS), lambda f: f.write(text.encode()))


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's named choices, checked before anything is built or written."""
  check_choice(config, "model.dtype", ("float32", "bfloat16"))
  check_choice(config, "eval.in9_normalization", ("in9", "imagenet"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the ensemble in ``workdir``; returns the contents of results.json."""
  check_inputs(config)
  results: dict = {"epochs": []}

  def build(mesh) -> training.Task:
    t = config.train
    parallel.check_batch_size(t.batch_size, mesh, "train.batch_size")
    data = synthetic_imagenet.resolve(config.data, workdir, config.seed)
    if not data.imagenet_dir:
      raise DataError("config.data.imagenet_dir is empty; pass --config.data.imagenet_dir=DIR "
                       "(an ImageFolder with train/ and val/), or use the ':tiny' variant")
    with_cf = t.cf_ratio > 0
    if with_cf and not data.cf_dir:
      raise DataError("config.data.cf_dir is empty; generate counterfactuals "
                       "(configs/imagenet_generate.py) and pass --config.data.cf_dir=DIR, or train "
                       "the ImageNet-only baseline (configs/imagenet_classifier.py:baseline)")
    if t.cf_ratio < 0 or (with_cf and imagenet.cf_batch_size(t.cf_ratio, t.batch_size) == 0):
      raise DataError(f"config.train.cf_ratio={t.cf_ratio} gives "
                      f"{imagenet.cf_batch_size(max(t.cf_ratio, 0), t.batch_size)} counterfactuals "
                      f"per batch of {t.batch_size}; use 0 (ImageNet only) or at least "
                      f"{1 / t.batch_size:g}")
    if with_cf:
      parallel.check_batch_size(imagenet.cf_batch_size(t.cf_ratio, t.batch_size), mesh,
                                "int(train.cf_ratio * train.batch_size)")
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    real = imagenet.imagenet_split(data.imagenet_dir, "train",
                                   os.path.join(data.eval_dir, "imagenet_class_index.json"))
    cf = imagenet.counterfactual_rows(data.cf_dir) if with_cf else None
    source = imagenet.ensemble_batches(
        real, cf, t.batch_size, t.cf_ratio, config.seed,
        transform=imagenet.TrainTransform(data.image_size),
        steps_per_epoch=t.steps_per_epoch if t.steps_per_epoch > 0 else None,
        process_index=jax.process_index(), process_count=jax.process_count())
    per_epoch = source.steps_per_epoch
    model = create_model(config)
    tx, schedule = create_optimizer(config, per_epoch)
    variables = initial_variables(config, model, workdir)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"], opt=tx.init(variables["params"]))
    forward = classifier_eval.make_forward(classifier_eval.model_logits(model), mesh)
    results.update(config=config.to_dict(), n_train=len(real), n_cf=len(cf) if cf else 0,
                   steps_per_epoch=per_epoch)

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      res = classifier_eval.evaluate(forward, variables, data, config.eval)
      if jax.process_index() == 0:
        results["epochs"].append({"epoch": step // per_epoch, **res})
        _write_results(workdir, results)
        text = classifier_eval.tables(res, config.eval.model_name)
        with open(os.path.join(workdir, "tables.md"), "w") as f:
          f.write(text)
        print(f"epoch {step // per_epoch}:\n{text}", flush=True)
      return classifier_eval.scalars(res)

    def on_resume(step: int) -> None:  # the epochs after the checkpoint are evaluated again
      path = os.path.join(workdir, RESULTS)
      if step and os.path.exists(path):
        with open(path) as f:
          results["epochs"] = [r for r in json.load(f)["epochs"] if r["epoch"] <= step // per_epoch]

    every = per_epoch * config.eval.every_epochs if config.eval.every_epochs > 0 else 0
    return training.Task(
        name=f"invariant ensemble ({config.eval.model_name})", state=state,
        step_fn=make_train_step(model, tx, schedule), metrics=metric_names(with_cf),
        num_steps=t.epochs * per_epoch, key=jax.random.key(config.seed), batches=source,
        params=lambda s: s.params,
        hooks=[training.Hook(every, evaluate, all_processes=True, at_end=bool(every))],
        on_resume=on_resume, bar_keys=("loss", "top1_real"), unit="step",
        export=lambda s: export_ensemble(s, model, os.path.join(workdir, resnet.EXPORT_DIR)),
        checkpoint_every=per_epoch * config.log.checkpoint_every_epochs)

  training.run(config, workdir, build)
  return results



def export_ensemble(state: TrainState, model: resnet.InvariantEnsemble, path: str) -> str:
  """The final ensemble as a converted-style dir (family ``invariant_ensemble``) for evaluation."""
  variables = training.host_copy({"params": state.params, "batch_stats": state.batch_stats})
  cfg = {"blocks": list(model.blocks), "width": model.width, "num_classes": model.num_classes}
  return checkpoints.replace_variables(path, variables, {
      "family": "invariant_ensemble", "model_config": cfg,
      "source": "cgn_jax.jobs.train_classifier_imagenet", "step": int(state.step)})
