"""The paper's classifier evaluations run on a model: ImageNet val accuracy, shape bias on
cue-conflict, IN-9 accuracies and the background gap, per output head.

The model is any function ``logits(variables, images) -> {head: [N, 1000] logits}``; it runs jitted
and sharded over the mesh on every process (each reads its rows of every batch), and the global
logits come back to every host, where ``classifier_metrics`` counts. Counts are summed over batches
and divided by the true number of images (the padded rows of the last batch are masked out).
Both the training job (after every epoch) and the evaluation job call :func:`evaluate`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from cgn_jax import parallel
from cgn_jax.data import imagenet
from cgn_jax.data.storage import DataError
from cgn_jax.evaluation import classifier_metrics as cm
from cgn_jax.models import resnet

LogitsFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]
# Row names of the tables per head (classifier_metrics.PAPER_RESULTS uses the same words).
# Keys are the authors' InvariantEnsemble outputs; a plain ResNet's output is "logits".
HEAD_NAMES = {"shape_preds": "shape head", "texture_preds": "texture head",
              "bg_preds": "background head", "avg_preds": "ensemble",
              "shape_texture_preds": "shape+texture", "logits": "model"}
# The Backgrounds table's row: the authors' BG-gap is on the shape+texture mean (no background head).
BACKGROUNDS_HEAD = ("shape_texture_preds", "logits")


def model_logits(model) -> LogitsFn:
  """The evaluation's ``logits(variables, images)`` of a model: every head of an ensemble, a plain
  ResNet's logits under the name ``logits``; BatchNorm in eval mode."""
  if isinstance(model, resnet.InvariantEnsemble):
    return lambda variables, images: model.apply(variables, images, train=False)
  return lambda variables, images: {"logits": model.apply(variables, images, train=False)}


def make_forward(logits_fn: LogitsFn, mesh) -> Callable[[Any, dict], dict[str, np.ndarray]]:
  """``forward(variables, host_batch) -> {head logits..., label columns, mask}`` for the global
  batch, as numpy on every process."""
  def run(variables, batch):
    out = dict(logits_fn(variables, batch["image"]))
    out.update({k: v for k, v in batch.items() if k != "image"})
    return out

  run = jax.jit(run, out_shardings=parallel.replicated(mesh))

  def forward(variables, host_batch: dict) -> dict[str, np.ndarray]:
    out = run(variables, parallel.from_host_rows(host_batch, mesh))
    return {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}

  return forward


def _limited(rows: imagenet.Rows, max_images: int) -> imagenet.Rows:
  return rows.select(np.arange(min(max_images, len(rows)))) if max_images > 0 else rows


def _batches(rows, transform, batch_size: int):
  return imagenet.EvalBatches(rows, batch_size, transform, process_index=jax.process_index(),
                              process_count=jax.process_count())


def _outputs(forward, variables, batches) -> dict[str, np.ndarray]:
  """Every output of the model and every label column over the whole set, padding removed."""
  parts: dict[str, list] = {}
  for b in batches:
    out = forward(variables, b)
    keep = out.pop("mask")
    for k, v in out.items():
      parts.setdefault(k, []).append(v[keep])
  batches.close()
  return {k: np.concatenate(v) for k, v in parts.items()}


def _heads(out: Mapping[str, np.ndarray], heads) -> list[str]:
  return [h for h in heads if h in out]


def imagenet_accuracy(forward, variables, rows, transform, batch_size: int, heads) -> dict:
  """{head: {"top1", "top5"}} in percent over ``rows`` (ImageNet val)."""
  out = _outputs(forward, variables, _batches(rows, transform, batch_size))
  return {h: cm.accuracies(cm.topk_correct(out[h], out["label"])) for h in _heads(out, heads)}


def ood_accuracy(forward, variables, rows, transform, batch_size: int, heads,
                 restrict: bool) -> dict:
  """{head: {"top1"}} on an out-of-distribution ImageFolder (Re-CGN's ImageNet-A and -Sketch).

  ``restrict``: ImageNet-A's protocol, the argmax over the classes the folder holds (its 200 WNIDs)
  instead of all 1000.
  """
  out = _outputs(forward, variables, _batches(rows, transform, batch_size))
  labels = out["label"]
  allowed = np.unique(rows.labels["label"])
  res = {}
  for h in _heads(out, heads):
    logits = np.asarray(out[h], np.float64)
    if restrict:
      masked = np.full_like(logits, -np.inf)
      masked[:, allowed] = logits[:, allowed]
      logits = masked
    res[h] = {"top1": cm.percent(int(np.sum(np.argmax(logits, -1) == labels)), len(labels))}
  return res


def shape_bias(forward, variables, rows, transform, batch_size: int, heads,
               mappings: cm.EvalMappings) -> dict:
  """{head: shape-bias metrics and counts} on cue-conflict ``rows``."""
  out = _outputs(forward, variables, _batches(rows, transform, batch_size))
  res = {}
  for h in _heads(out, heads):
    _, counts = cm.shape_bias_counts(out[h], out["shape_label"], out["texture_label"], mappings)
    res[h] = {**cm.shape_bias_metrics(counts), "counts": counts}
  return res


def backgrounds(forward, variables, in9_dir: str, variants, transform, batch_size: int, heads,
                mappings: cm.EvalMappings, classes: str | None, max_images: int) -> dict:
  """{head: {variant accuracy..., "bg_gap"}} on the IN-9 variants found in ``in9_dir``."""
  counts: dict[str, dict[str, dict[str, int]]] = {}
  for variant in variants:
    rows = _limited(imagenet.in9_rows(in9_dir, variant, classes), max_images)
    out = _outputs(forward, variables, _batches(rows, transform, batch_size))
    for h in _heads(out, heads):
      counts.setdefault(h, {})[variant] = cm.in9_correct(out[h], out["label"], mappings.in_to_in9)
  return {h: cm.backgrounds_metrics(c) for h, c in counts.items()}


def evaluate(forward, variables, data: Any, ev: Any, heads=tuple(HEAD_NAMES),
             sets=("imagenet", "shape_bias", "backgrounds")) -> dict:
  """Every evaluation of ``sets`` whose folder ``data`` names (``data.imagenet_dir``,
  ``cue_conflict_dir``, ``in9_dir``); ``ev`` is ``config.eval``. Returns nested JSON-able results."""
  mappings = cm.load_mappings(data.eval_dir)
  size, resize = data.image_size, data.resize
  in_transform = imagenet.EvalTransform(size, resize)
  results: dict[str, Any] = {}
  if "imagenet" in sets and data.imagenet_dir:
    rows = _limited(imagenet.imagenet_split(data.imagenet_dir, "val",
                                            os.path.join(data.eval_dir, "imagenet_class_index.json")),
                    ev.max_images)
    results["imagenet"] = imagenet_accuracy(forward, variables, rows, in_transform, ev.batch_size,
                                            heads)
  if "shape_bias" in sets and data.cue_conflict_dir:
    rows = _limited(imagenet.cue_conflict_rows(
        data.cue_conflict_dir, os.path.join(data.eval_dir, "geirhos16_categories.json")),
        ev.max_images)
    results["shape_bias"] = shape_bias(forward, variables, rows, in_transform, ev.batch_size,
                                       heads, mappings)
  if "backgrounds" in sets and data.in9_dir:
    mean, std = ((imagenet.IN9_MEAN, imagenet.IN9_STD) if ev.in9_normalization == "in9"
                 else (imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD))
    if ev.in9_normalization not in ("in9", "imagenet"):
      raise DataError(f"config.eval.in9_normalization must be 'in9' or 'imagenet', not "
                       f"'{ev.in9_normalization}'")
    # The authors feed IN-9's 224x224 images as they are; other sizes are resized and cropped.
    transform = (imagenet.AsIsTransform(size, mean, std) if ev.in9_as_is
                 else imagenet.EvalTransform(size, resize, mean, std))
    variants = [v for v in ev.in9_variants
                if os.path.isdir(os.path.join(data.in9_dir, v))] or list(ev.in9_variants)
    results["backgrounds"] = backgrounds(
        forward, variables, data.in9_dir, variants, transform, ev.batch_size, heads, mappings,
        os.path.join(data.eval_dir, "in9_classes.txt"), ev.max_images)
  for name, folder, restrict in (("imagenet_a", data.imagenet_a_dir, True),
                                 ("sketch", data.sketch_dir, False)):
    if name in sets and folder:
      rows = _limited(imagenet.image_folder(folder, os.path.join(data.eval_dir,
                                                                 "imagenet_class_index.json")),
                      ev.max_images)
      results[name] = ood_accuracy(forward, variables, rows, in_transform, ev.batch_size, heads,
                                   restrict)
  return results


def scalars(results: Mapping[str, Any]) -> dict[str, float]:
  """Flat ``{"imagenet/avg/top1": ...}`` scalars of :func:`evaluate`'s results, for metrics rows."""
  out = {}
  for table, per_head in results.items():
    for head, values in per_head.items():
      for k, v in values.items():
        if isinstance(v, (int, float)):
          out[f"{table}/{head}/{k}"] = float(v)
  return out


def tables(results: Mapping[str, Any], model_name: str) -> str:
  """The paper's two tables (what ``results`` holds of them) with the published numbers beside."""
  text = []
  if "shape_bias" in results or "imagenet" in results:
    rows: dict[str, dict[str, float]] = {}
    for head in HEAD_NAMES:
      row = {}
      if head in results.get("shape_bias", {}):
        row["shape_bias"] = 100 * results["shape_bias"][head]["shape_bias"]
      row.update(results.get("imagenet", {}).get(head, {}))
      if row:
        rows[f"{model_name} {HEAD_NAMES[head]}"] = row
    text.append("### Shape vs texture (cue-conflict shape bias, ImageNet val)\n\n" +
                cm.shape_bias_table(rows))
  if "backgrounds" in results:
    per_head = results["backgrounds"]
    rows = {}
    # The paper's row first (BACKGROUNDS_HEAD), then the other heads.
    for head in list(BACKGROUNDS_HEAD) + [h for h in HEAD_NAMES if h not in BACKGROUNDS_HEAD]:
      if head in per_head:
        name = model_name if head in BACKGROUNDS_HEAD else f"{model_name} {HEAD_NAMES[head]}"
        rows[name] = per_head[head]
    text.append("### Backgrounds Challenge (IN-9 accuracy, BG-gap)\n\n" + cm.backgrounds_table(rows))
  ood = [(k, t) for k, t in (("imagenet_a", "ImageNet-A top-1 (200 classes)"),
                             ("sketch", "ImageNet-Sketch top-1")) if k in results]
  if ood:
    rows = {}
    for head in HEAD_NAMES:
      row = {k: results[k][head]["top1"] for k, _ in ood if head in results[k]}
      if row:
        rows[f"{model_name} {HEAD_NAMES[head]}"] = row
    text.append("### Out of distribution (as in Re-CGN)\n\n" + cm.markdown_table(rows, {}, ood))
  return "\n".join(text)
